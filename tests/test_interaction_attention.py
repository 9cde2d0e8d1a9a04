"""Correctness of lfi.ops.interaction_attention against the float64 reference (tests/reference.py).

Every backend usable here (torch; triton on CUDA or under TRITON_INTERPRET=1) is compared on fresh
random inputs, over whole tensors (outputs, maps and gradients), so garbage in any element -- edge
tiles, padding rows/columns, masked rows -- fails the comparison.

Shapes stay small: under the Triton CPU interpreter every tile step costs milliseconds.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import (
    BACKENDS, DEVICE, DTYPE_IDS, HAS_CUDA, assert_close, backend_supports, bool_mask, detached64,
    float_mask, make_gen, make_qkv, randn, run_and_compare,
)
from lfi.ops import interaction_attention
from reference import reference_attention


def _params(cases):
    return [pytest.param(c, id=c["id"]) for c in cases]


# --------------------------------------------------------------------------------------------------
# Shape grid (float32): M != N, ragged N, N = 1, M = 1, head dims, Dv != D, grouped-query heads
# --------------------------------------------------------------------------------------------------

SHAPES = [
    dict(id="M5_N37_D64", B=2, H=2, Hkv=2, M=5, N=37, D=64),
    dict(id="M40_N17_D40", B=1, H=2, Hkv=2, M=40, N=17, D=40),
    dict(id="M16_N33_D16_gqa2-1", B=1, H=2, Hkv=1, M=16, N=33, D=16),
    dict(id="M20_N47_D80", B=1, H=1, Hkv=1, M=20, N=47, D=80),
    dict(id="M9_N70_D96", B=1, H=2, Hkv=2, M=9, N=70, D=96),
    dict(id="M7_N1_D32", B=2, H=2, Hkv=2, M=7, N=1, D=32),
    dict(id="M1_N50_D64", B=2, H=2, Hkv=2, M=1, N=50, D=64),
    dict(id="M1_N1_D16", B=1, H=1, Hkv=1, M=1, N=1, D=16),
    dict(id="M12_N29_D40_Dv24", B=1, H=2, Hkv=2, M=12, N=29, D=40, Dv=24),
    dict(id="M17_N21_D24_Dv64", B=1, H=1, Hkv=1, M=17, N=21, D=24, Dv=64),
    dict(id="gqa4-2_M19_N23_D32", B=2, H=4, Hkv=2, M=19, N=23, D=32),
    dict(id="gqa4-1_M19_N23_D32", B=1, H=4, Hkv=1, M=19, N=23, D=32),
    dict(id="M80_N80_D64", B=1, H=1, Hkv=1, M=80, N=80, D=64),
    dict(id="M3_N64_D8", B=2, H=1, Hkv=1, M=3, N=64, D=8),
]


@pytest.mark.parametrize("case", _params(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_fp32(backend, case):
    gen = make_gen("shapes", case["id"], backend)
    q, k, v = make_qkv(case["B"], case["H"], case["Hkv"], case["M"], case["N"], case["D"], case.get("Dv"),
                       gen=gen, requires_grad=True)
    out, w, _ = run_and_compare(backend, q, k, v, need_weights=True, gen=gen)
    assert out.shape == (case["B"], case["H"], case["M"], case.get("Dv", case["D"]))
    assert w.shape == (case["B"], case["H"], case["M"], case["N"])


def test_no_weights_returns_tensor(backend):
    gen = make_gen("no_weights", backend)
    q, k, v = make_qkv(2, 2, 1, 11, 19, 16, gen=gen, requires_grad=True)
    run_and_compare(backend, q, k, v, need_weights=False, loss="out", gen=gen)


# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------

DTYPE_CASES = [
    dict(id="plain_M5_N37_D64", B=2, H=2, Hkv=2, M=5, N=37, D=64, mask=None, causal=False, rows=None),
    dict(id="gqa_causal_boolmask_M40_N17_D40", B=1, H=2, Hkv=1, M=40, N=17, D=40, mask="bool", causal=True,
         rows=None),
    dict(id="floatmask_rows_M20_N70_D80", B=1, H=2, Hkv=2, M=20, N=70, D=80, mask="float", causal=False,
         rows=(3, 18)),
]


def _dtype_params():
    out = []
    for backend in BACKENDS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            if not backend_supports(backend, dtype):
                continue
            for c in DTYPE_CASES:
                out.append(pytest.param(backend, dtype, c, id=f"{backend}-{DTYPE_IDS[dtype]}-{c['id']}"))
    return out


@pytest.mark.parametrize("backend,dtype,case", _dtype_params())
def test_dtypes(backend, dtype, case):
    gen = make_gen("dtypes", backend, DTYPE_IDS[dtype], case["id"])
    B, H, Hkv, M, N, D = (case[x] for x in ("B", "H", "Hkv", "M", "N", "D"))
    q, k, v = make_qkv(B, H, Hkv, M, N, D, dtype=dtype, gen=gen, requires_grad=True)
    mask = None
    if case["mask"] == "bool":
        mask = bool_mask((B, 1, M, N), gen)
    elif case["mask"] == "float":
        mask = float_mask((1, H, M, N), gen, dtype=dtype)
        mask[0, 1, 5] = float("-inf")  # a fully masked row inside the returned map rows
    run_and_compare(backend, q, k, v, mask, is_causal=case["causal"], need_weights=True, rows=case["rows"],
                    gen=gen)


# --------------------------------------------------------------------------------------------------
# Masks: bool and float, several broadcast shapes
# --------------------------------------------------------------------------------------------------

MB, MH, MM, MN = 2, 2, 13, 37
MASK_SHAPES = {
    "MN": (MM, MN),
    "N": (MN,),
    "B11N": (MB, 1, 1, MN),
    "1HMN": (1, MH, MM, MN),
    "BHMN": (MB, MH, MM, MN),
    "B1M1": (MB, 1, MM, 1),
    "1H1N": (1, MH, 1, MN),
}


@pytest.mark.parametrize("shape_id", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masks(backend, kind, shape_id):
    gen = make_gen("masks", backend, kind, shape_id)
    q, k, v = make_qkv(MB, MH, 1, MM, MN, 32, gen=gen, requires_grad=True)
    shape = MASK_SHAPES[shape_id]
    mask = bool_mask(shape, gen) if kind == "bool" else float_mask(shape, gen)
    run_and_compare(backend, q, k, v, mask, need_weights=True, gen=gen)


def test_float_mask_large_negative_values(backend):
    """Large *finite* negative additive values are not 'masked': a row that is -1e30 everywhere is a
    uniform distribution (as in SDPA), and -1e30 on some keys gives them probability 0."""
    gen = make_gen("large_neg", backend)
    B, H, M, N = 1, 2, 6, 20
    q, k, v = make_qkv(B, H, H, M, N, 16, gen=gen, requires_grad=True)
    mask = float_mask((M, N), gen)
    mask[1] = -1e30
    mask[3, ::2] = -1e30
    out, w, _ = run_and_compare(backend, q, k, v, mask, need_weights=True, gen=gen)
    assert torch.allclose(w[:, :, 1].double().cpu(), torch.full((B, H, N), 1.0 / N, dtype=torch.float64))


def test_float_mask_finfo_min(backend):
    """HF-style padding masks use torch.finfo(dtype).min: a row that is finfo.min everywhere is a
    uniform distribution mathematically (and in SDPA); partially finfo.min rows give those keys 0."""
    gen = make_gen("finfo_min", backend)
    B, H, M, N = 1, 2, 6, 20
    q, k, v = make_qkv(B, H, H, M, N, 16, gen=gen, requires_grad=True)
    mask = float_mask((B, 1, M, N), gen)
    fmin = torch.finfo(torch.float32).min
    mask[:, :, 2, 5:] = fmin
    mask[:, :, 4] = fmin
    run_and_compare(backend, q, k, v, mask, need_weights=True, gen=gen)


def test_float_mask_other_dtype(backend):
    """A float32 additive mask with float16 inputs."""
    gen = make_gen("mask_dtype", backend)
    q, k, v = make_qkv(1, 2, 2, 9, 27, 32, dtype=torch.float16, gen=gen, requires_grad=True)
    mask = float_mask((9, 27), gen, dtype=torch.float32)
    run_and_compare(backend, q, k, v, mask, need_weights=True, gen=gen)


# --------------------------------------------------------------------------------------------------
# Causal (top-left aligned), also with M != N and combined with masks
# --------------------------------------------------------------------------------------------------

CAUSAL_CASES = [
    dict(id="M16_N16", M=16, N=16, mask=None),
    dict(id="M33_N33", M=33, N=33, mask=None),
    dict(id="M5_N37", M=5, N=37, mask=None),
    dict(id="M40_N17", M=40, N=17, mask=None),
    dict(id="M1_N9", M=1, N=9, mask=None),
    dict(id="M9_N1", M=9, N=1, mask=None),
    dict(id="M20_N37_bool", M=20, N=37, mask="bool"),
    dict(id="M37_N20_bool", M=37, N=20, mask="bool"),
    dict(id="M20_N37_float", M=20, N=37, mask="float"),
    dict(id="M37_N20_float", M=37, N=20, mask="float"),
]


@pytest.mark.parametrize("case", _params(CAUSAL_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal(backend, case):
    gen = make_gen("causal", backend, case["id"])
    B, H, M, N = 1, 2, case["M"], case["N"]
    q, k, v = make_qkv(B, H, 1, M, N, 32, gen=gen, requires_grad=True)
    mask = None
    if case["mask"] == "bool":
        mask = bool_mask((B, H, M, N), gen)
    elif case["mask"] == "float":
        mask = float_mask((M, N), gen)
    out, w, _ = run_and_compare(backend, q, k, v, mask, is_causal=True, need_weights=True, gen=gen)
    # Structural: nothing above the (top-left) diagonal.
    upper = torch.ones(M, N, dtype=torch.bool).triu(1)
    assert (w.detach().cpu()[..., upper] == 0).all()


def test_causal_matches_sdpa(backend):
    """is_causal follows torch SDPA's convention (top-left aligned), also for M != N."""
    gen = make_gen("causal_sdpa", backend)
    for M, N in ((7, 19), (19, 7)):
        q, k, v = make_qkv(1, 2, 2, M, N, 16, gen=gen)
        got = interaction_attention(q, k, v, is_causal=True, backend=backend)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------------
# Fully masked rows: zeros in out and weights, zero (finite) gradients
# --------------------------------------------------------------------------------------------------

def _fully_masked_case(name, gen, B, H, M, N):
    """Returns (mask, is_causal, dead) with dead a bool (B, H, M) of rows that have no key."""
    causal = False
    dead = torch.zeros(B, H, M, dtype=torch.bool)
    if name == "bool_rows":
        mask = bool_mask((B, H, M, N), gen, p_true=0.8)
        for b, h, i in ((0, 0, 0), (0, 1, 5), (1, 0, 16), (1, 1, M - 1), (0, 0, 17)):
            mask[b, h, i] = False
            dead[b, h, i] = True
        mask[1, 0, 3] = False  # a fully masked row ...
        mask[1, 0, 3, N - 1] = True  # ... except its very last key (ragged tile): not dead
    elif name == "float_neginf_rows":
        mask = float_mask((1, 1, M, N), gen)
        for i in (2, 16, M - 1):
            mask[0, 0, i] = float("-inf")
            dead[:, :, i] = True
        mask[0, 0, 4, : N - 1] = float("-inf")  # only the last key left
    elif name == "key_padding_whole_batch":
        mask = bool_mask((B, 1, 1, N), gen, p_true=0.6)
        mask[1] = False
        dead[1] = True
    elif name == "causal_plus_mask":
        mask = bool_mask((M, N), gen, p_true=0.9)
        mask[:, 0] = False  # row 0 attends only key 0 under causal masking -> dead
        causal = True
        dead[:, :, 0] = True
        for i in range(1, M):
            if not mask[i, : min(i + 1, N)].any():
                dead[:, :, i] = True
    elif name == "all_masked":
        mask = torch.zeros(M, N, dtype=torch.bool)
        dead[:] = True
    elif name == "float_neginf_all":
        mask = torch.full((1, 1, 1, N), float("-inf"))
        dead[:] = True
    else:
        raise AssertionError(name)
    return mask.to(DEVICE), causal, dead


FULLY_MASKED = ["bool_rows", "float_neginf_rows", "key_padding_whole_batch", "causal_plus_mask",
                "all_masked", "float_neginf_all"]


@pytest.mark.parametrize("name", FULLY_MASKED)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows(backend, name):
    gen = make_gen("fully_masked", backend, name)
    B, H, M, N = 2, 2, 21, 35
    q, k, v = make_qkv(B, H, 2, M, N, 16, gen=gen, requires_grad=True)
    mask, causal, dead = _fully_masked_case(name, gen, B, H, M, N)
    out, w, grads = run_and_compare(backend, q, k, v, mask, is_causal=causal, need_weights=True, gen=gen)
    out, w = out.detach().cpu(), w.detach().cpu()
    assert (out[dead] == 0).all(), "fully masked rows must give exactly zero output"
    assert (w[dead] == 0).all(), "fully masked rows must give exactly zero weights"
    assert (grads["q"].cpu()[dead] == 0).all(), "fully masked rows must give zero dq"
    if dead.all():
        assert (grads["k"] == 0).all() and (grads["v"] == 0).all()
    # Live rows are proper distributions.
    sums = w.double().sum(-1)
    torch.testing.assert_close(sums[~dead], torch.ones_like(sums[~dead]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss", ["out", "weights"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_single_loss(backend, loss):
    gen = make_gen("fully_masked_single", backend, loss)
    B, H, M, N = 1, 2, 18, 20
    q, k, v = make_qkv(B, H, 1, M, N, 16, gen=gen, requires_grad=True)
    mask, causal, dead = _fully_masked_case("float_neginf_rows", gen, B, H, M, N)
    run_and_compare(backend, q, k, v, mask, is_causal=causal, need_weights=True, loss=loss,
                    rows=(1, 17), gen=gen)


# --------------------------------------------------------------------------------------------------
# need_weights / average_attn_weights / weights_rows, losses on out, weights or both
# --------------------------------------------------------------------------------------------------

WB, WH, WHKV, WM, WN = 1, 4, 2, 37, 45
ROWS = [None, (0, 1), (3, 21), (16, 32), (WM - 1, WM), (0, WM)]


def _rows_id(r):
    return "all" if r is None else f"{r[0]}-{r[1]}"


@pytest.mark.parametrize("average", [False, True], ids=["heads", "avg"])
@pytest.mark.parametrize("rows", ROWS, ids=_rows_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_options(backend, rows, average):
    gen = make_gen("weights_options", backend, rows, average)
    q, k, v = make_qkv(WB, WH, WHKV, WM, WN, 32, gen=gen, requires_grad=True)
    out, w, _ = run_and_compare(backend, q, k, v, need_weights=True, average=average, rows=rows, gen=gen)
    n_rows = WM if rows is None else rows[1] - rows[0]
    assert w.shape == ((WB, n_rows, WN) if average else (WB, WH, n_rows, WN))


@pytest.mark.parametrize("loss", ["out", "weights", "both"])
@pytest.mark.parametrize("rows", [None, (3, 21)], ids=_rows_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_on_out_or_weights(backend, rows, loss):
    gen = make_gen("loss_modes", backend, rows, loss)
    q, k, v = make_qkv(WB, WH, WHKV, WM, WN, 32, gen=gen, requires_grad=True)
    run_and_compare(backend, q, k, v, need_weights=True, rows=rows, loss=loss, gen=gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_options_with_masks_and_causal(backend):
    """weights_rows + averaging with a float mask, causal masking and a fully masked row."""
    gen = make_gen("weights_masks", backend)
    B, H, M, N = 2, 2, 30, 26
    q, k, v = make_qkv(B, H, 1, M, N, 24, gen=gen, requires_grad=True)
    mask = float_mask((B, 1, M, N), gen)
    mask[0, 0, 20] = float("-inf")
    for average in (False, True):
        run_and_compare(backend, q, k, v, mask, is_causal=True, need_weights=True, average=average,
                        rows=(14, 27), gen=gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_slice_form(backend):
    """weights_rows also accepts a slice (lfi extension), with Python's negative-index semantics."""
    gen = make_gen("slice", backend)
    q, k, v = make_qkv(1, 2, 2, 10, 12, 16, gen=gen)
    _, w_tuple = interaction_attention(q, k, v, need_weights=True, weights_rows=(2, 7), backend=backend)
    _, w_slice = interaction_attention(q, k, v, need_weights=True, weights_rows=slice(2, 7), backend=backend)
    torch.testing.assert_close(w_slice, w_tuple, atol=0, rtol=0)
    _, w_neg = interaction_attention(q, k, v, need_weights=True, weights_rows=slice(-8, -3), backend=backend)
    torch.testing.assert_close(w_neg, w_tuple, atol=0, rtol=0)
    _, w_tail = interaction_attention(q, k, v, need_weights=True, weights_rows=slice(-4, None), backend=backend)
    _, w_all = interaction_attention(q, k, v, need_weights=True, backend=backend)
    torch.testing.assert_close(w_tail, w_all[:, :, -4:], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# Gradient of a float mask (requires_grad): dS summed over the broadcast dims
# --------------------------------------------------------------------------------------------------

GB, GH, GM, GN = 2, 2, 11, 23
MASK_GRAD_CASES = [
    dict(id="11MN", shape=(1, 1, GM, GN)),
    dict(id="B11N", shape=(GB, 1, 1, GN)),
    dict(id="MN_2d", shape=(GM, GN)),
    dict(id="BHMN", shape=(GB, GH, GM, GN)),
    dict(id="1H1N", shape=(1, GH, 1, GN)),
    dict(id="11MN_neginf", shape=(1, 1, GM, GN), neg_inf=True),
    dict(id="B11N_causal_rows", shape=(GB, 1, 1, GN), causal=True, rows=(2, 9)),
]


@pytest.mark.parametrize("case", _params(MASK_GRAD_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_grad(backend, case):
    gen = make_gen("mask_grad", backend, case["id"])
    q, k, v = make_qkv(GB, GH, 1, GM, GN, 16, gen=gen, requires_grad=True)
    mask = float_mask(case["shape"], gen)
    if case.get("neg_inf"):
        mask[..., 3, :] = float("-inf")  # one fully masked row
        mask[..., 5, ::3] = float("-inf")
    mask.requires_grad_(True)
    _, _, grads = run_and_compare(backend, q, k, v, mask, is_causal=case.get("causal", False),
                                  need_weights=True, rows=case.get("rows"), gen=gen)
    assert grads["attn_mask"].shape == mask.shape
    if case.get("neg_inf"):
        assert (grads["attn_mask"][..., 3, :] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_grad_out_only(backend):
    gen = make_gen("mask_grad_out", backend)
    q, k, v = make_qkv(1, 2, 2, 9, 17, 16, gen=gen)  # only the mask requires grad
    mask = float_mask((1, 1, 9, 17), gen).requires_grad_(True)
    run_and_compare(backend, q, k, v, mask, need_weights=False, loss="out", gen=gen)


# --------------------------------------------------------------------------------------------------
# Inputs with unusual strides
# --------------------------------------------------------------------------------------------------

NONCONTIG = ["packed_qkv", "packed_kv_cross", "transposed_storage", "sliced_head_dim",
             "expanded_batch_kv", "expanded_mask", "transposed_mask"]


@pytest.mark.parametrize("layout", NONCONTIG)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous(backend, layout):
    gen = make_gen("noncontig", backend, layout)
    B, H, M, N, D = 2, 2, 19, 19, 32
    mask = None
    if layout == "packed_qkv":  # timm-style: (B, M, 3, H, D) -> 3 x (B, H, M, D)
        qkv = randn((B, M, 3, H, D), gen, requires_grad=True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "packed_kv_cross":
        N = 33
        q = randn((B, 7, H, D), gen, requires_grad=True).transpose(1, 2)
        kv = randn((B, N, 2, H, D), gen, requires_grad=True)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "transposed_storage":  # head dim is not the fastest-moving dim
        q = randn((B, H, D, M), gen, requires_grad=True).transpose(-1, -2)
        k = randn((B, H, D, N), gen, requires_grad=True).transpose(-1, -2)
        v = randn((B, N, D, H), gen, requires_grad=True).permute(0, 3, 1, 2)
    elif layout == "sliced_head_dim":
        q = randn((B, H, M, 2 * D), gen, requires_grad=True)[..., 5:5 + D]
        k = randn((B, H, N + 4, D + 8), gen, requires_grad=True)[:, :, 2:2 + N, :D]
        v = randn((B, 2 * H, N, D), gen, requires_grad=True)[:, ::2]
    elif layout == "expanded_batch_kv":  # stride 0 over the batch
        q = randn((B, H, M, D), gen, requires_grad=True)
        k = randn((1, H, N, D), gen, requires_grad=True).expand(B, H, N, D)
        v = randn((1, H, N, D), gen, requires_grad=True).expand(B, H, N, D)
    elif layout in ("expanded_mask", "transposed_mask"):
        q, k, v = make_qkv(B, H, H, M, N, D, gen=gen, requires_grad=True)
        if layout == "expanded_mask":
            mask = bool_mask((M, N), gen).expand(B, H, M, N)
        else:
            mask = float_mask((B, N, M), gen).transpose(-1, -2).unsqueeze(1)
    else:
        raise AssertionError(layout)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()) or mask is not None
    run_and_compare(backend, q, k, v, mask, need_weights=True, rows=(2, q.shape[2]), gen=gen)


# --------------------------------------------------------------------------------------------------
# 3-D inputs, scale, partial requires_grad, extreme scores
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("average", [False, True], ids=["heads", "avg"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_three_d_inputs(backend, average):
    gen = make_gen("3d", backend, average)
    B, M, N, D = 2, 9, 21, 24
    q = randn((B, M, D), gen, requires_grad=True)
    k = randn((B, N, D), gen, requires_grad=True)
    v = randn((B, N, 16), gen, requires_grad=True)
    mask = bool_mask((M, N), gen)
    out, w, _ = run_and_compare(backend, q, k, v, mask, need_weights=True, average=average, rows=(1, 8), gen=gen)
    assert out.shape == (B, M, 16)
    assert w.shape == (B, 7, N)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_d_inputs_batched_mask_matches_sdpa(backend):
    """SDPA's (B, L, E) convention: a (B, M, N) mask belongs to each batch element."""
    gen = make_gen("3d_bmn", backend)
    B, M, N, D = 2, 7, 19, 16
    q, k, v = (randn((B, L, D), gen) for L in (M, N, N))
    mask = bool_mask((B, M, N), gen)
    out = interaction_attention(q, k, v, mask, backend=backend)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("scale", [0.3, 1.0, 1e-3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scale(backend, scale):
    gen = make_gen("scale", backend, scale)
    q, k, v = make_qkv(1, 2, 2, 10, 26, 40, gen=gen, requires_grad=True)
    run_and_compare(backend, q, k, v, scale=scale, need_weights=True, gen=gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores_stable(backend):
    """Scores of magnitude ~100 (near one-hot softmax): the online softmax must not overflow."""
    gen = make_gen("large_scores", backend)
    q, k, v = make_qkv(1, 2, 2, 20, 50, 64, gen=gen, requires_grad=True, scale=3.5)
    run_and_compare(backend, q, k, v, need_weights=True, gen=gen)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad(backend, which):
    gen = make_gen("partial_grad", backend, which)
    q, k, v = make_qkv(1, 2, 1, 8, 20, 16, gen=gen)
    {"q": q, "k": k, "v": v}[which].requires_grad_(True)
    run_and_compare(backend, q, k, v, need_weights=True, gen=gen)


def test_no_grad_mode(backend):
    gen = make_gen("no_grad", backend)
    q, k, v = make_qkv(1, 2, 2, 8, 20, 16, gen=gen, requires_grad=True)
    with torch.no_grad():
        out, w = interaction_attention(q, k, v, need_weights=True, backend=backend)
    assert not out.requires_grad and not w.requires_grad
    ref_out, ref_p = reference_attention(*detached64(q, k, v))
    assert_close(out, ref_out, torch.float32, name="out")
    assert_close(w, ref_p, torch.float32, name="weights")


def test_auto_backend_matches_reference():
    gen = make_gen("auto")
    q, k, v = make_qkv(2, 2, 1, 9, 14, 16, gen=gen, requires_grad=True)
    run_and_compare("auto", q, k, v, bool_mask((9, 14), gen), need_weights=True, gen=gen)


@pytest.mark.parametrize("env_backend", BACKENDS)
def test_lfi_backend_env_overrides_auto(monkeypatch, env_backend):
    """LFI_BACKEND picks the backend behind backend="auto" (DESIGN.md section 2)."""
    monkeypatch.setenv("LFI_BACKEND", env_backend)
    gen = make_gen("env", env_backend)
    q, k, v = make_qkv(1, 2, 2, 9, 14, 16, gen=gen, requires_grad=True)
    run_and_compare("auto", q, k, v, need_weights=True, gen=gen)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_backends_agree(backend):
    """Sanity: with the same fp16 inputs every other backend is close to the torch backend."""
    gen = make_gen("agree")
    q, k, v = make_qkv(1, 2, 2, 17, 33, 32, dtype=torch.float16, gen=gen)
    mask = bool_mask((17, 33), gen)
    a = interaction_attention(q, k, v, mask, need_weights=True, backend=backend)
    b = interaction_attention(q, k, v, mask, need_weights=True, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("chunk_bytes", ["1", "4000"], ids=["1row", "few_rows"])
def test_torch_backend_row_chunks(monkeypatch, chunk_bytes):
    """The torch backend computes in row chunks (LFI_TORCH_CHUNK_BYTES bounds a chunk): results must
    not depend on where the chunk boundaries fall (masks with an M dim, causal, map rows, mask grad)."""
    monkeypatch.setenv("LFI_TORCH_CHUNK_BYTES", chunk_bytes)
    gen = make_gen("chunks", chunk_bytes)
    B, H, M, N = 2, 2, 23, 19
    q, k, v = make_qkv(B, H, 1, M, N, 16, gen=gen, requires_grad=True)
    mask = float_mask((1, H, M, N), gen, neg_inf_frac=0.2)
    mask[0, 1, 9] = float("-inf")
    mask.requires_grad_(True)
    for average in (False, True):
        run_and_compare("torch", q, k, v, mask, is_causal=True, need_weights=True, average=average,
                        rows=(4, 19), gen=gen)


# --------------------------------------------------------------------------------------------------
# Dropout (kept light)
# --------------------------------------------------------------------------------------------------

def test_dropout_torch_backend():
    gen = make_gen("dropout")
    q, k, v = make_qkv(2, 2, 2, 12, 30, 16, gen=gen, requires_grad=True)
    ref_out, ref_p = reference_attention(*detached64(q, k, v))
    # p = 0.0 is exactly the no-dropout path.
    out0 = interaction_attention(q, k, v, dropout_p=0.0, backend="torch")
    assert_close(out0, ref_out, torch.float32, name="out (dropout_p=0)")

    torch.manual_seed(1234)
    out1, w1 = interaction_attention(q, k, v, dropout_p=0.5, need_weights=True, backend="torch")
    torch.manual_seed(1234)
    out2, w2 = interaction_attention(q, k, v, dropout_p=0.5, need_weights=True, backend="torch")
    assert torch.isfinite(out1).all()
    assert not torch.allclose(out1, out0), "dropout_p=0.5 must change the output"
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)  # same seed -> same result
    # The returned maps are taken before dropout: the exact P.
    assert_close(w1, ref_p, torch.float32, name="weights (pre-dropout)")
    # Gradients flow and are finite.
    gq, gk, gv = torch.autograd.grad((out1 * out1).sum() + w1.sum(), (q, k, v))
    for g in (gq, gk, gv):
        assert torch.isfinite(g).all()
    # Dropout is unbiased in expectation: averaging many draws approaches the no-dropout output.
    torch.manual_seed(0)
    with torch.no_grad():
        mean = sum(interaction_attention(q, k, v, dropout_p=0.5, backend="torch") for _ in range(100)) / 100
    assert (mean - out0).abs().mean() < 0.05  # about 0.015 expected


def test_dropout_triton_falls_back_with_one_warning():
    """backend="triton" with dropout_p > 0 runs the torch path (same draws for the same seed) and
    warns once per process. Run in a subprocess so that other tests cannot have used up the warning."""
    if "triton" not in BACKENDS:
        pytest.skip("triton backend not usable here")
    code = textwrap.dedent(
        """
        import os, warnings, torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
        from lfi.ops import interaction_attention
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 8, 16, generator=g).to(dev) for _ in range(3))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.manual_seed(7)
            a = interaction_attention(q, k, v, dropout_p=0.3, backend="triton")
            torch.manual_seed(7)
            b = interaction_attention(q, k, v, dropout_p=0.3, backend="triton")
        user = [r for r in rec if issubclass(r.category, UserWarning)]
        assert len(user) == 1, [str(r.message) for r in rec]
        torch.manual_seed(7)
        c = interaction_attention(q, k, v, dropout_p=0.3, backend="torch")
        assert torch.equal(a, b) and torch.equal(a, c)
        d = interaction_attention(q, k, v, backend="torch")
        assert not torch.allclose(a, d) and torch.isfinite(a).all()
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------------------------------
# GPU-only
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: compiled Triton kernels and fp16 tensor-core paths")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_triton_larger_shapes(dtype):
    gen = make_gen("cuda_large", DTYPE_IDS[dtype])
    B, H, M, N, D = 2, 6, 197, 197, 64
    q, k, v = make_qkv(B, H, H, M, N, D, dtype=dtype, gen=gen, device="cuda", requires_grad=True)
    mask = bool_mask((B, 1, 1, N), gen, p_true=0.9, device="cuda")
    run_and_compare("triton", q, k, v, mask, need_weights=True, rows=(180, 197), gen=gen)
    run_and_compare("triton", q, k, v, is_causal=True, need_weights=True, average=True, gen=gen)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_auto_picks_triton_and_matches():
    gen = make_gen("cuda_auto")
    q, k, v = make_qkv(1, 2, 2, 64, 96, 64, dtype=torch.float16, gen=gen, device="cuda", requires_grad=True)
    run_and_compare("auto", q, k, v, need_weights=True, gen=gen)


def test_torch_backend_backward_reads_full_maps():
    """backend="torch" keeps the returned maps of every row (its P, in the compute dtype) for the
    backward instead of recomputing them, as eager attention keeps P: same gradients, and an
    in-place edit of those maps before backward is refused as autograd refuses it for eager."""
    from lfi.backends.reference import interaction_attention as ref

    gen = make_gen("keep_probs")
    q, k, v = make_qkv(2, 2, 1, 9, 21, 16, gen=gen, requires_grad=True)
    out, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    assert ref.probs_to_keep(q, w, 0, 9) is w
    assert ref.probs_to_keep(q, w[:, :, :4], 0, 4) is None and ref.probs_to_keep(q.half(), w.half(), 0, 9) is None
    run_and_compare("torch", q, k, v, need_weights=True, gen=gen)
    run_and_compare("torch", q, k, v, bool_mask((2, 1, 9, 21), gen), is_causal=True, need_weights=True, gen=gen)
    out, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # Without maps, one row chunk: the maps are still computed and kept for the backward, not returned.
    assert ref.keeps_maps_for_backward(q, k, v, None, None)
    assert not ref.keeps_maps_for_backward(q.detach(), k.detach(), v.detach(), None, None)
    assert not ref.keeps_maps_for_backward(q.half(), k.half(), v.half(), None, None)
    run_and_compare("torch", q, k, v, loss="out", gen=gen)
