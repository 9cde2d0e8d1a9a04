"""Correctness of lfi.ops.interaction_attention against the float64 reference (tests/reference.py):
shapes, dtypes, strided / 3-D inputs, scale, partial gradients.

Every backend of the matrix (torch; triton on CUDA or under TRITON_INTERPRET=1; cuda where the lfi_C
extension is built) is compared on fresh random inputs, over whole tensors (outputs, maps and
gradients), so garbage in any element -- edge tiles, padding rows/columns, masked rows -- fails the
comparison. Masks and causal masking: test_interaction_attention_masks.py; map options:
test_interaction_attention_maps.py; backend selection, dropout, GPU-only: ..._backends.py.

Shapes stay small: under the Triton CPU interpreter every tile step costs milliseconds. A few shapes
have N > 128 keys, more than one key block of the cuda backend's CPU kernels.
"""
from __future__ import annotations

import pytest
import torch

from helpers import DTYPE_IDS
from helpers import assert_close
from helpers import backend_dtype_params
from helpers import bool_mask
from helpers import case_params
from helpers import detached64
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from helpers import randn
from helpers import run_and_compare
from lfi.ops import interaction_attention
from reference import reference_attention

# --------------------------------------------------------------------------------------------------
# Shape grid (float32): M != N, ragged N, N = 1, M = 1, head dims, Dv != D, grouped-query heads
# --------------------------------------------------------------------------------------------------

# A case table, one shape per row: its rows are alike by design (a duplicate-block finder pairs them by shape).
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
    # from the cuda backend's suite: grouped-query heads with N = 1 and M > N, N > 128 (several key
    # blocks of the CPU kernels), head dims 128 and 256
    dict(id="M40_N17_D40_gqa2-1", B=1, H=2, Hkv=1, M=40, N=17, D=40),
    dict(id="M7_N1_D16_gqa", B=2, H=4, Hkv=2, M=7, N=1, D=16),
    dict(id="M1_N300_D80", B=1, H=2, Hkv=2, M=1, N=300, D=80),
    dict(id="M33_N197_D128_gqa4-1", B=1, H=4, Hkv=1, M=33, N=197, D=128),
    dict(id="M9_N45_D256", B=1, H=1, Hkv=1, M=9, N=45, D=256),
]


@pytest.mark.parametrize("case", case_params(SHAPES))
def test_shapes_fp32(backend, case):
    gen = make_gen("shapes", case["id"], backend)
    q, k, v = make_qkv(case["B"], case["H"], case["Hkv"], case["M"], case["N"], case["D"], case.get("Dv"),
                       gen=gen, requires_grad=True)
    if backend == "triton" and q.is_cuda and case["D"] > 128 and not torch.backends.cuda.matmul.allow_tf32:
        # Exact float32 on a GPU: the forward runs; the backward's tiles exceed sm_90's shared memory
        # at head dims over 128, and it says so (README: backends).
        out, w = interaction_attention(q, k, v, need_weights=True, backend=backend)
        ref_out, ref_w = reference_attention(*detached64(q, k, v))
        assert_close(out, ref_out, torch.float32, name="out")
        assert_close(w, ref_w, torch.float32, name="weights")
        with pytest.raises(ValueError, match="supports head dims up to 128"):
            (out.sum() + w.sum()).backward()
        return
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
    # N > 128: two key blocks of the cuda backend's CPU kernels, in every dtype
    dict(id="floatmask_rows_M20_N140_D80", B=1, H=2, Hkv=2, M=20, N=140, D=80, mask="float", causal=False,
         rows=(3, 18)),
]


@pytest.mark.parametrize("backend,dtype,case", backend_dtype_params(cases=DTYPE_CASES))
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
# Inputs with unusual strides
# --------------------------------------------------------------------------------------------------

NONCONTIG = ["packed_qkv", "packed_kv_cross", "transposed_storage", "sliced_head_dim",
             "expanded_batch_kv", "expanded_mask", "transposed_mask"]


@pytest.mark.parametrize("layout", NONCONTIG)
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


def test_packed_qkv_masked_rows_and_stride0_grad(backend):
    """q, k, v sliced from a packed qkv projection with an expanded (stride 0) mask and the last map
    rows; the stride-0 upstream gradient of .sum() reaching the packed projection; 3-D inputs with
    M != N."""
    gen = make_gen("strided", backend)
    B, L, H, D = 2, 19, 2, 16
    qkv = randn((B, L, 3, H, D), gen).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = bool_mask((1, 1, 1, L), gen).expand(B, H, L, L)
    run_and_compare(backend, q, k, v, mask, need_weights=True, rows=(L - 4, L), gen=gen)
    out = interaction_attention(q, k, v, backend=backend)
    g, = torch.autograd.grad(out.sum(), qkv)
    (qkv64,) = detached64(qkv)
    ref_out, _ = reference_attention(*qkv64.permute(2, 0, 3, 1, 4).unbind(0))
    g_ref, = torch.autograd.grad(ref_out.sum(), qkv64)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-4, rtol=1e-4)
    q3, k3, v3 = (randn((2, 11 if i == 0 else 7, 16), gen, requires_grad=True) for i in range(3))
    run_and_compare(backend, q3, k3, v3, need_weights=True, gen=gen)  # 3-D (B, L, D) inputs


# --------------------------------------------------------------------------------------------------
# 3-D inputs, scale, partial requires_grad, extreme scores
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("average", [False, True], ids=["heads", "avg"])
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
def test_scale(backend, scale):
    gen = make_gen("scale", backend, scale)
    q, k, v = make_qkv(1, 2, 2, 10, 26, 40, gen=gen, requires_grad=True)
    run_and_compare(backend, q, k, v, scale=scale, need_weights=True, gen=gen)


def test_large_scores_stable(backend):
    """Scores of magnitude ~100 (near one-hot softmax): the online softmax must not overflow."""
    gen = make_gen("large_scores", backend)
    q, k, v = make_qkv(1, 2, 2, 20, 50, 64, gen=gen, requires_grad=True, scale=3.5)
    run_and_compare(backend, q, k, v, need_weights=True, gen=gen)


@pytest.mark.parametrize("which", ["q", "k", "v"])
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

