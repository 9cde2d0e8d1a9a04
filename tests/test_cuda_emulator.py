"""The CPU emulator of the CUDA subset (csrc/emu/cuda_emu.h) and the tensor-core kernels under it.

(a) the emulator's own model of the tensor-core primitives (csrc/cuda/tc_common.cuh): a one-warp
    kernel (csrc/emu/tc_selftest_emu.cpp) stages A and B with cp.async, loads fragments with
    ldmatrix (plain and .trans) and multiplies with mma.sync m16n8k16; the correct variant must
    match a float64 matmul, and each deliberately wrong variant (register order, accumulator
    layout, missing or wrong cp.async wait, missing .trans) must not -- so a fragment-layout or
    synchronisation bug in a kernel cannot pass under the emulator;
(b) the bf16 / fp16 tensor-core attention forward and backward (csrc/cuda/attention_tc.cu:
    dK / dV, dQ and the mask gradient) under the emulator, against the float64 reference, over
    the correctness grid (odd N, M != N, N = 1, D 24/40/64/80/128 with Dv != D, strided inputs,
    GQA, bool / float masks with fully masked rows, causal with M != N, map rows and gradients
    through them, the fused KL and its gradient), including the fast interior-tile loops and the
    backward pre-pass's map rows (rowsum(P G), P recomputed on tensor cores);
(c) attention_kl_qk's bf16 / fp16 tensor-core forward, dq and dk (csrc/cuda/kl.cu) against the
    float64 reference: odd N, M != N, N = 1, D 24/40/64/80/128, implicit teachers with Dt != D
    (Ht = H or 1, GQA on both sides), strided inputs, dense probability / logit targets (float32 and
    q's dtype, one with non-contiguous keys), key masks with fully masked rows, and the kernels'
    FAST interior-tile loops next to their CHECKED edge tiles. attention_kl takes precomputed logits
    (no matrix product) and stays on CUDA cores; it and the fp32 kernels run under the emulator in
    tests/test_cuda_extension.py (opt-in).

Runs by default: it builds the emulator variant of the extension once (about 1.5 minutes on 2 cores,
cached in TORCH_EXTENSIONS_DIR); the 74 tests then take ~50 s on 2 idle cores (at most ~2.5 s each;
the attention_kl_qk grid ~14 s of it). The emulator runs a std::thread per CUDA thread: on cores shared
with other builds the same run took 3-7 minutes.
Skipped only where the build tools are missing (no C++ compiler or ninja), or with
LFI_TEST_CUDA_EMULATOR=0.
"""
from __future__ import annotations

import os

import pytest
import torch

from cuda_emu_util import attention_bwd
from cuda_emu_util import attention_fwd
from cuda_emu_util import check_kl_qk
from cuda_emu_util import close
from helpers import bool_mask
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from lfi.backends.cuda import _ext
from lfi.backends.torch import attention_kl_qk as RQ


@pytest.fixture(scope="module")
def emu():
    if os.environ.get("LFI_TEST_CUDA_EMULATOR", "1") == "0":
        pytest.skip("LFI_TEST_CUDA_EMULATOR=0 disables the CUDA emulator tests")
    if _ext.PROBE["build_problem"] is not None:
        pytest.skip(f"cannot build the CUDA emulator here: {_ext.PROBE['build_problem']}")
    return _ext.load_emulator()


# ------------------------------------------------------------------------------------------------
# (a) the fragment / mma / cp.async model
# ------------------------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16]
VARIANTS = {1: "A registers a1/a2 swapped", 2: "accumulator c1/c3 rows swapped", 3: "no cp.async wait",
            4: "wait_group 1 leaves B in flight", 5: "B loaded without .trans"}


def _operands(dtype, seed):
    gen = make_gen("tc-selftest", str(dtype), seed)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 16, generator=gen).to(dtype)
    b2 = torch.randn(16, 16, generator=gen).to(dtype)
    return a, b, b2


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_mma_fragments_match_matmul(emu, dtype):
    a, b, b2 = _operands(dtype, 0)
    want = a.double() @ b.double()
    torch.testing.assert_close(emu.tc_selftest(a, b, None, 0).double(), want, atol=1e-4, rtol=1e-5)
    # Two B tiles through the same shared buffer (cp.async after a barrier): A B + A B2.
    want2 = a.double() @ (b.double() + b2.double())
    torch.testing.assert_close(emu.tc_selftest(a, b, b2, 0).double(), want2, atol=1e-4, rtol=1e-5)
    # A non-symmetric, element-distinct probe: every (row, col) of C must land where it belongs.
    eye = torch.eye(16, dtype=dtype)
    idx = (torch.arange(256, dtype=torch.float32).reshape(16, 16) / 4).to(dtype)
    torch.testing.assert_close(emu.tc_selftest(idx, eye, None, 0), idx.float(), atol=0, rtol=0)
    torch.testing.assert_close(emu.tc_selftest(eye, idx, None, 0), idx.float(), atol=0, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS.values()))
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_wrong_layout_or_sync_fails(emu, dtype, variant):
    """A deliberately wrong kernel must not reproduce the matmul under the emulator."""
    a, b, _ = _operands(dtype, variant)
    got = emu.tc_selftest(a, b, None, variant).double()
    want = a.double() @ b.double()
    bad = ~torch.isfinite(got) | ((got - want).abs() > 1e-2 * (1 + want.abs()))
    assert bad.sum() >= 16, f"variant {variant} ({VARIANTS[variant]}) went unnoticed"
    if variant in (3, 4):  # reading a cp.async destination before its wait reads poison
        assert torch.isnan(got).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_missing_wait_on_second_tile_fails(emu, dtype):
    a, b, b2 = _operands(dtype, 7)
    got = emu.tc_selftest(a, b, b2, 6)
    assert torch.isnan(got).all(), "reading a tile whose cp.async was not waited for must read poison"


# ------------------------------------------------------------------------------------------------
# (b) the tensor-core attention forward under the emulator
# ------------------------------------------------------------------------------------------------

# Shapes chosen for the tensor-core tiling (64 query rows per block, 64-key tiles): partial row and
# key tiles, several key tiles (the cp.async double buffer), head dims padded to 32 / 64 / 96 / 128
# and dims not a multiple of 8 (element-wise staging), GQA, causal with M != N.
TC_FORWARD = [
    dict(id="odd_D64", B=1, H=2, Hkv=2, M=70, N=45, D=64, Dv=64),
    dict(id="D40_3tiles", B=1, H=1, Hkv=1, M=33, N=150, D=40, Dv=40),
    dict(id="D80_gqa_bool_causal", B=1, H=4, Hkv=2, M=67, N=67, D=80, Dv=80, mask="bool", causal=True),
    dict(id="D128_float_maps_kl", B=1, H=2, Hkv=1, M=40, N=70, D=128, Dv=128, mask="float", rows=(3, 38), kl=True),
    dict(id="D24_Dv20_strided", B=2, H=1, Hkv=1, M=9, N=77, D=24, Dv=20, strided=True, causal=True, rows=(0, 9)),
    dict(id="N1_M1", B=1, H=1, Hkv=1, M=1, N=1, D=64, Dv=64),
    # Unmasked interior tiles: the separately compiled fast loop (two or more iterations).
    dict(id="fast_loop_D64", B=1, H=1, Hkv=1, M=65, N=200, D=64, Dv=64),
    dict(id="fast_loop_causal_D128", B=1, H=1, Hkv=1, M=130, N=130, D=128, Dv=128, causal=True),
    dict(id="causal_M_gt_N_kl", B=1, H=2, Hkv=1, M=80, N=20, D=32, Dv=32, causal=True, kl=True, mask="bool"),
    # The NaN contract (README, Numerics): a NaN score makes its whole row NaN, maps included (also past
    # the causal diagonal); a row the mask empties stays 0 even where V holds NaN.
    dict(id="nan_k_maps_causal", B=1, H=1, Hkv=1, M=70, N=140, D=64, Dv=64, causal=True, rows=(0, 70), nan="k"),
    dict(id="nan_q_fast_loop", B=1, H=1, Hkv=1, M=65, N=130, D=64, Dv=64, nan="q"),
    dict(id="nan_v_masked_row", B=1, H=1, Hkv=1, M=20, N=40, D=32, Dv=32, mask="bool", rows=(0, 20), nan="v"),
]


def _strided(q, k, x):
    """q and x with a non-contiguous last dim, k with every other element of its rows (the
    element-wise staging paths)."""
    return (q.transpose(2, 3).contiguous().transpose(2, 3), torch.cat([k, k], dim=-1)[..., ::2],
            x.transpose(2, 3).contiguous().transpose(2, 3))


def _row_mask(B, M, N, gen):
    """A (B, 1, M, N) bool mask whose row min(2, M - 1) is fully masked."""
    mask = bool_mask((B, 1, M, N), gen, device="cpu")
    mask[0, 0, min(2, M - 1)] = False
    return mask


def _forward_case(case, dtype):
    gen = make_gen("emu-tc-fwd", case["id"], str(dtype))
    B, H, Hkv, M, N, D, Dv = (case[x] for x in ("B", "H", "Hkv", "M", "N", "D", "Dv"))
    q, k, v = make_qkv(B, H, Hkv, M, N, D, Dv, dtype=dtype, gen=gen, device="cpu")
    if case.get("strided"):
        q, k, v = _strided(q, k, v)
    mask = None
    if case.get("mask") == "bool":
        mask = _row_mask(B, M, N, gen)
    elif case.get("mask") == "float":
        mask = float_mask((1, H, M, N), gen, device="cpu")
        mask[0, 0, 0] = float("-inf")
    target = torch.rand(B, 1, M, N, generator=gen) if case.get("kl") else None
    if case.get("nan") == "k":
        k[0, 0, 1, 0] = float("nan")  # rows >= 1 see it (causal); row 0 stays finite
    elif case.get("nan") == "q":
        q[0, 0, 4, 1] = float("nan")
    elif case.get("nan") == "v":
        v[0, 0, 3, 0] = float("nan")  # out[..., 0] of rows attending key 3; row 2 is fully masked
        mask[0, 0, :, 3] = True
        mask[0, 0, 2] = False
    return q, k, v, mask, target


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in TC_FORWARD])
def test_emulated_tc_attention_forward(emu, case, dtype):
    q, k, v, mask, target = _forward_case(case, dtype)
    rows, causal, scale = case.get("rows", (0, 0)), case.get("causal", False), case["D"] ** -0.5
    got, want = attention_fwd(emu, q, k, v, mask, target, scale, causal, rows)
    # out / weights are b16 (P enters P V rounded to b16 as on the GPU); stats and KL are fp32.
    tol = 1.5e-2 if dtype == torch.bfloat16 else 3e-3
    if case.get("nan"):  # a NaN row's statistics: log l is NaN; its max m may be NaN or not (fmaxf)
        nan_row = want[1][..., 1].isnan()
        assert got[1][..., 1][nan_row].isnan().all()
        got[1] = got[1].clone()
        got[1][..., 0][nan_row] = want[1][..., 0][nan_row].float()
    for name, g, w, t in zip(("out", "stats", "weights", "kl", "tnorm"), got, want, (tol, 1e-4, tol, 2e-4, 1e-4)):
        if w is not None and w.numel():
            close(g, w, t, t, name)


# dK / dV tiles: 64 keys per block, query tiles of 64 (parts of 32 / 16 rows past D = 64); dQ as
# the forward. Cases cover the fast and general bodies, GQA (dK / dV summed over the group),
# gradients through map rows (G) and the fused KL, and the mask gradient (dS written by dQ).
TC_BACKWARD = [
    dict(id="odd_D64", B=1, H=2, Hkv=2, M=70, N=45, D=64, Dv=64),
    dict(id="fast_D64_gqa", B=1, H=2, Hkv=1, M=129, N=128, D=64, Dv=64),
    dict(id="D40_causal", B=1, H=1, Hkv=1, M=130, N=130, D=40, Dv=40, causal=True),
    dict(id="D80_bool_maps", B=1, H=1, Hkv=1, M=67, N=70, D=80, Dv=80, mask="bool", rows=(5, 60)),
    dict(id="D128_float_kl_causal", B=1, H=1, Hkv=1, M=80, N=75, D=128, Dv=128, mask="float", kl=True,
         causal=True),
    dict(id="D24_Dv20_strided_maps_kl", B=1, H=2, Hkv=1, M=9, N=77, D=24, Dv=20, strided=True, rows=(0, 9), kl=True),
    # Map rows from the second 64-row block on (the pre-pass's tensor-core rowsum(P G) over a block
    # range that starts past 0), causal.
    dict(id="maps_rows_70_135_causal", B=1, H=1, Hkv=1, M=140, N=100, D=64, Dv=64, causal=True, rows=(70, 135)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in TC_BACKWARD])
def test_emulated_tc_attention_backward(emu, case, dtype):
    q, k, v, mask, target = _forward_case(case, dtype)
    B, H, M, N, Dv = (case[x] for x in ("B", "H", "M", "N", "Dv"))
    rows, causal, scale = case.get("rows", (0, 0)), case.get("causal", False), case["D"] ** -0.5
    gen = make_gen("emu-tc-bwd", case["id"], str(dtype))
    got, want = attention_fwd(emu, q, k, v, mask, target, scale, causal, rows)
    go = torch.randn(B, H, M, Dv, generator=gen).to(dtype)
    gw = torch.randn(B, H, rows[1] - rows[0], N, generator=gen).to(dtype) if rows[1] > rows[0] else None
    gkl = torch.randn(B, H, M, generator=gen) if target is not None else None
    got_g, want_g = attention_bwd(emu, got, want, q, k, v, mask, target, scale, causal, rows, go, gw, gkl)
    # P and dS enter the tensor-core products rounded to b16 (as on the GPU); outputs are b16.
    tol = 4e-2 if dtype == torch.bfloat16 else 8e-3
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got_g, want_g):
        if w is not None and w.numel():
            close(g, w, tol, tol, name)


# ------------------------------------------------------------------------------------------------
# (c) attention_kl_qk on tensor cores under the emulator (csrc/cuda/kl.cu: forward, dq, dk)
# ------------------------------------------------------------------------------------------------

# 64 query rows per forward / dq block, 64-key tiles (double-buffered), dk blocks of 64 keys looping
# over the group's heads; the padded head dim covers D and the teacher's Dt. target: "probs" / "logits"
# (dense, float32), or "implicit" (teacher q_t, k_t of the student's dtype; Ht = H or 1, Htk | Ht).
# mask: a (B, 1, M, N) key mask with one fully masked row, or (B, 1, 1, N) with a batch masked whole.
# D80_implicit_gqa_keymask: the dk block's two query heads use different teacher key heads (K_t
# restaged per head into alternating buffers). Each kernel is compiled per target kind (implicit;
# dense of q's dtype, tdtype="b16"; dense float32) with FAST loops over interior tiles: the fast_*
# cases (N >= 128 without a mask; M >= 64 for dk's full query tiles) run them next to edge tiles,
# D40_logits_3tiles the float32 one (odd N: the FAST loops read the target element-wise);
# strided_target_probs reads a target whose keys are not at unit stride (the CHECKED loops only).
TC_KL_QK = [
    dict(id="odd_D64_gqa_probs_rowmask", B=1, H=2, Hkv=1, M=70, N=45, D=64, target="probs", mask="rows"),
    dict(id="D40_logits_3tiles", B=1, H=1, Hkv=1, M=33, N=150, D=40, target="logits"),
    dict(id="D80_implicit_gqa_keymask", B=2, H=2, Hkv=1, M=9, N=37, D=80, target="implicit", Ht=2, Htk=2, Dt=48,
         mask="keys"),
    dict(id="D128_implicit_Ht1", B=1, H=2, Hkv=1, M=17, N=41, D=128, target="implicit", Ht=1, Htk=1, Dt=128),
    dict(id="D24_Dt72_strided", B=1, H=1, Hkv=1, M=9, N=77, D=24, target="implicit", Ht=1, Htk=1, Dt=72,
         strided=True),
    dict(id="full_tiles_D64_logits", B=1, H=1, Hkv=1, M=128, N=128, D=64, target="logits", mask="rows"),
    dict(id="N1_M1", B=1, H=1, Hkv=1, M=1, N=1, D=32, target="probs"),
    dict(id="fast_D64_probs_b16_gqa", B=1, H=2, Hkv=1, M=70, N=200, D=64, target="probs", tdtype="b16"),
    dict(id="fast_D64_logits_b16", B=1, H=1, Hkv=1, M=65, N=131, D=64, target="logits", tdtype="b16"),
    dict(id="fast_D48_implicit", B=1, H=2, Hkv=2, M=66, N=130, D=48, target="implicit", Ht=2, Htk=1, Dt=64),
    dict(id="strided_target_probs", B=1, H=1, Hkv=1, M=20, N=140, D=32, target="probs", tstrided=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in TC_KL_QK])
def test_emulated_tc_kl_qk(emu, case, dtype):
    gen = make_gen("emu-tc-klqk", case["id"], str(dtype))
    B, H, Hkv, M, N, D = (case[x] for x in ("B", "H", "Hkv", "M", "N", "D"))
    q = (torch.randn(B, H, M, D, generator=gen) * 0.7).to(dtype)
    k = (torch.randn(B, Hkv, N, D, generator=gen) * 0.7).to(dtype)
    target = q_t = k_t = None
    if case["target"] == "implicit":
        q_t = torch.randn(B, case["Ht"], M, case["Dt"], generator=gen).to(dtype)
        k_t = torch.randn(B, case["Htk"], N, case["Dt"], generator=gen).to(dtype)
    elif case["target"] == "logits":
        target = torch.randn(B, 1, M, N, generator=gen) * 2
    else:
        target = torch.rand(B, 1, M, N, generator=gen)
        target[0, 0, min(1, M - 1)] = 0  # a row with no target mass
    if case.get("tdtype") == "b16":
        target = target.to(dtype)
    if case.get("tstrided"):
        target = target.transpose(-1, -2).contiguous().transpose(-1, -2)
    # The same case-to-input steps as _forward_case's, on kl_qk's inputs (q_t, key masks): alike in shape only.
    if case.get("strided"):
        q, k, q_t = _strided(q, k, q_t)
    key_mask = None
    if case.get("mask") == "rows":
        key_mask = _row_mask(B, M, N, gen)
    elif case.get("mask") == "keys":
        key_mask = torch.rand(B, 1, 1, N, generator=gen) < 0.6
        key_mask[-1] = False  # a batch whose rows are all fully masked
    g = torch.randn(B, H, M, generator=gen)
    logits = case["target"] != "probs"
    # The forward's products are exact b16 x b16 -> fp32 sums (fp32 statistics); in the backward dS
    # enters the tensor-core products rounded to b16 (as on the GPU) and dq / dk are b16.
    bwd_tol = 4e-2 if dtype == torch.bfloat16 else 8e-3
    check_kl_qk(emu, q, k, target, q_t, k_t, key_mask, g, D ** -0.5, 0.8, logits, 1e-4, bwd_tol)


# A negative target probability, which a GPU call does not check (a check would synchronise, see
# lfi.ops._kl.checks_values_free), gives its row's KL NaN, as the float64 reference (F.kl_div's
# formula) does, and leaves the other rows as they were: the fused KL (lfi_math.h's kl_add) and
# attention_kl_qk's tensor-core loops, CHECKED edge tiles and FAST interior ones (N = 200).
@pytest.mark.parametrize("tdtype", ["fp32", "b16"])
@pytest.mark.parametrize("M,N", [(9, 37), (70, 200)], ids=["edge_tiles", "fast_tiles"])
def test_emulated_negative_probability_gives_nan_row(emu, M, N, tdtype):
    gen = make_gen("emu-negative-target", M, N, tdtype)
    dtype, D = torch.bfloat16, 64
    q, k, v = make_qkv(1, 1, 1, M, N, D, dtype=dtype, gen=gen, device="cpu")
    target = torch.rand(1, 1, M, N, generator=gen)
    target = target.to(dtype) if tdtype == "b16" else target
    bad = target.clone()
    bad[0, 0, 3, N // 2] = -0.25
    scale = D ** -0.5
    kl_qk = [emu.kl_qk_fwd(q, k, t, None, None, None, scale, 1.0, False)[0] for t in (target, bad)]
    fused = [attention_fwd(emu, q, k, v, None, t, scale, False, (0, 0))[0][3] for t in (target, bad)]
    want = RQ.kl_qk_forward(q.double(), k.double(), bad.double(), None, None, None, scale, 1.0, False)[0]
    for name, (good_kl, bad_kl) in (("attention_kl_qk", kl_qk), ("fused KL", fused)):
        assert torch.isnan(bad_kl[0, 0, 3]) and torch.isnan(want[0, 0, 3]), name
        assert torch.isfinite(good_kl).all(), name
        others = torch.arange(M) != 3
        assert torch.equal(bad_kl[0, 0, others], good_kl[0, 0, others]), name
