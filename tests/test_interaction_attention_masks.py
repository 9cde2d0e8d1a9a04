"""interaction_attention with masks against the float64 reference (tests/reference.py): bool and float
masks in every broadcast shape, huge / finfo.min additive values, causal masking (top-left aligned,
M != N, combined with masks), fully masked rows (exact zeros, zero gradients) and the gradient of a
float mask that requires grad. Every backend of the matrix (helpers.BACKEND_PARAMS).
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE
from helpers import bool_mask
from helpers import case_params
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from helpers import run_and_compare
from lfi.ops import interaction_attention

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


def test_float_mask_huge_values(backend):
    """-1e30 and finfo.min in one (M, N) mask: rows at -1e30 or finfo.min everywhere are uniform (as
    in SDPA), not masked; such values on some keys give those keys probability 0 (the row statistics
    (m, log l) are kept apart)."""
    gen = make_gen("huge_values", backend)
    B, H, M, N = 1, 2, 6, 20
    q, k, v = make_qkv(B, H, H, M, N, 16, gen=gen, requires_grad=True)
    mask = float_mask((M, N), gen)
    fmin = torch.finfo(torch.float32).min
    mask[1] = -1e30
    mask[3, ::2] = -1e30
    mask[4] = fmin
    mask[5, 5:] = fmin
    _, w, _ = run_and_compare(backend, q, k, v, mask, need_weights=True, gen=gen)
    uniform = torch.full((B, H, N), 1.0 / N, dtype=torch.float64)
    for row in (1, 4):
        torch.testing.assert_close(w[:, :, row].double().cpu(), uniform)


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
    # from the cuda backend's suite: M > N with a bool mask; N > 128 (two key blocks of its CPU kernels)
    dict(id="M40_N17_bool", M=40, N=17, mask="bool"),
    dict(id="M70_N150_bool", M=70, N=150, mask="bool"),
]


@pytest.mark.parametrize("case", case_params(CAUSAL_CASES))
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
def test_fully_masked_rows_single_loss(backend, loss):
    gen = make_gen("fully_masked_single", backend, loss)
    B, H, M, N = 1, 2, 18, 20
    q, k, v = make_qkv(B, H, 1, M, N, 16, gen=gen, requires_grad=True)
    mask, causal, dead = _fully_masked_case("float_neginf_rows", gen, B, H, M, N)
    run_and_compare(backend, q, k, v, mask, is_causal=causal, need_weights=True, loss=loss,
                    rows=(1, 17), gen=gen)


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
    # from the cuda backend's suite: map rows with the batch/head-broadcast and the full-shape mask
    dict(id="11MN_rows", shape=(1, 1, GM, GN), rows=(2, 9)),
    dict(id="BHMN_rows", shape=(GB, GH, GM, GN), rows=(2, 9)),
]


@pytest.mark.parametrize("case", case_params(MASK_GRAD_CASES))
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


def test_float_mask_grad_out_only(backend):
    gen = make_gen("mask_grad_out", backend)
    q, k, v = make_qkv(1, 2, 2, 9, 17, 16, gen=gen)  # only the mask requires grad
    mask = float_mask((1, 1, 9, 17), gen).requires_grad_(True)
    run_and_compare(backend, q, k, v, mask, need_weights=False, loss="out", gen=gen)
