"""The KL loss fused into the attention pass: interaction_attention(..., kl_target=t, kl_reduction=r).

Returns (out, kl) -- (out, weights, kl) with need_weights -- where kl = KL(t' || P) per query row and
t' is the target restricted to the keys the row attends (bool/float mask, causal) and renormalised
there. Compared on every backend of the matrix (helpers.BACKEND_PARAMS) against separate float64
references of tests/reference.py: reference_attention for out/weights and ref_fused_kl_rows (the
F.kl_div reference on the masked scores) for kl; gradients of a loss on out (+ weights) + kl against
the reference autograd.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import DEVICE
from helpers import DTYPE_IDS
from helpers import INTERPRETED
from helpers import assert_close
from helpers import backend_dtype_params
from helpers import backend_params
from helpers import bool_mask
from helpers import case_params
from helpers import detached64
from helpers import float_mask
from helpers import force_exact_fp32_split
from helpers import make_gen
from helpers import make_qkv
from helpers import randn
from helpers import record_dkdv_parts
from helpers import schema_args
from kl_cases import REDUCTIONS
from kl_cases import make_target
from kl_cases import target_shape
from lfi.ops import attention_kl_qk
from lfi.ops import interaction_attention
from reference import NEG_INF
from reference import ref_fused_kl_rows
from reference import ref_reduce
from reference import reference_attention
from reference import select_weights


def run_fused(backend, q, k, v, mask=None, *, target, is_causal=False, scale=None, reduction="none",
              need_weights=False, rows=None, gen, dtype=None, loss=("out", "weights", "kl")):
    """interaction_attention with a kl_target vs the separate references: out, weights, kl, and the
    gradients (q, k, v and a float mask that requires grad) of a random linear loss on `loss`."""
    dtype = dtype or q.dtype
    kw = dict(is_causal=is_causal, scale=scale, kl_target=target, kl_reduction=reduction, backend=backend)
    if need_weights:
        kw.update(need_weights=True, weights_rows=rows)
    res = interaction_attention(q, k, v, mask, **kw)
    assert isinstance(res, tuple) and len(res) == (3 if need_weights else 2)
    out, w, kl = (res[0], res[1], res[2]) if need_weights else (res[0], None, res[1])
    q64, k64, v64, m64 = detached64(q, k, v, mask)
    ref_out, ref_p = reference_attention(q64, k64, v64, m64, is_causal=is_causal, scale=scale)
    ref_rows = ref_fused_kl_rows(q64, k64, target, m64, is_causal, scale)
    ref_kl = ref_reduce(ref_rows, reduction, q.shape[0])
    assert out.dtype == q.dtype
    assert kl.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32), kl.dtype
    assert kl.shape == ref_kl.shape
    assert_close(out, ref_out, dtype, name="out")
    assert_close(kl, ref_kl, dtype, grad=True, name=f"kl ({reduction})")
    ref_w = None
    if need_weights:
        ref_w = select_weights(ref_p, rows)
        assert_close(w, ref_w, dtype, name="weights")

    inputs = {n: t for n, t in zip("qkv", (q, k, v)) if t.requires_grad}
    refs = {"q": q64, "k": k64, "v": v64}
    if mask is not None and mask.requires_grad:
        inputs["attn_mask"], refs["attn_mask"] = mask, m64
    if not inputs or not loss:
        return out, w, kl, {}
    terms, ref_terms = [], []
    if "out" in loss:
        r = randn(out.shape, gen, out.dtype, out.device)
        terms.append((out * r).sum())
        ref_terms.append((ref_out * r.double()).sum())
    if "weights" in loss and need_weights:
        r = randn(w.shape, gen, w.dtype, w.device)
        terms.append((w * r).sum())
        ref_terms.append((ref_w * r.double()).sum())
    if "kl" in loss:
        r = randn(kl.shape, gen, kl.dtype, kl.device) if reduction == "none" else 0.7
        terms.append((kl * r).sum())
        ref_terms.append((ref_kl * (r.double() if isinstance(r, torch.Tensor) else r)).sum())
    got = torch.autograd.grad(sum(terms), list(inputs.values()))
    want = torch.autograd.grad(sum(ref_terms), [refs[n] for n in inputs], allow_unused=True)
    grads = {}
    for (n, t), g, e in zip(inputs.items(), got, want):
        e = torch.zeros_like(refs[n]) if e is None else e
        assert g.shape == t.shape and g.dtype == t.dtype, f"grad {n}: {tuple(g.shape)} {g.dtype}"
        assert_close(g, e, dtype, grad=True, name=f"grad {n}")
        grads[n] = g
    return out, w, kl, grads



def _target(shape, gen, zero_rows=()):
    t = make_target(shape, "probs", gen)
    t[..., ::5] = 0.0  # t = 0 terms
    for idx in zero_rows:
        t[idx] = 0.0
    return t


# --------------------------------------------------------------------------------------------------
# Cases: masks (with fully masked rows), causal with M != N, broadcast targets, GQA, weights
# --------------------------------------------------------------------------------------------------

# Exact float32: the fused KL with causal masking or GQA runs dK/dV as two launches (dV, then dK;
# the launcher's dkdv_parts), with a 2-D mask alone as one.
DKDV_PARTS_3XTF32 = {"gqa4-2_boolmask_fullrow_zeromass": [2, 1], "causal_M7_N20_111N": [2, 1],
                     "causal_boolmask_M20_N9": [2, 1], "floatmask_neginf_grad": [3]}

CASES = [
    dict(id="plain_B1MN", B=2, H=2, Hkv=2, M=9, N=33, tshape="B1MN"),
    dict(id="gqa4-2_boolmask_fullrow_zeromass", B=2, H=4, Hkv=2, M=7, N=20, tshape="BHMN", mask="bool"),
    dict(id="causal_M7_N20_111N", B=1, H=2, Hkv=1, M=7, N=20, tshape="111N", causal=True),
    dict(id="causal_boolmask_M20_N9", B=1, H=2, Hkv=2, M=20, N=9, tshape="B1MN", causal=True, mask="bool_MN"),
    dict(id="floatmask_neginf_grad", B=1, H=2, Hkv=2, M=9, N=21, tshape="B1MN", mask="float_grad"),
    dict(id="weights_rows_2-7", B=2, H=2, Hkv=1, M=9, N=17, tshape="B1MN", weights=True, rows=(2, 7)),
    dict(id="N1", B=2, H=2, Hkv=2, M=5, N=1, tshape="B1MN"),
    dict(id="M5_N70_scale", B=1, H=2, Hkv=2, M=5, N=70, tshape="B1MN", scale=0.3, mask="bool_key"),
]


def _case_inputs(case, gen, dtype=torch.float32):
    B, H, Hkv, M, N = (case[x] for x in ("B", "H", "Hkv", "M", "N"))
    q, k, v = make_qkv(B, H, Hkv, M, N, 16, dtype=dtype, gen=gen, requires_grad=True)
    zero_rows = [(1, 0, 4)] if case["tshape"] == "BHMN" else []
    target = _target(target_shape(case["tshape"], B, H, M, N), gen, zero_rows)
    mask = None
    kind = case.get("mask")
    if kind == "bool":
        mask = bool_mask((B, 1, M, N), gen)
        mask[0, 0, 3] = False  # a row without an attended key
        mask[1, 0, 2] = False
        mask[1, 0, 2, :3] = True
        target[1, ..., 2, :3] = 0.0  # target mass only on keys the row does not attend
    elif kind == "bool_MN":
        mask = bool_mask((M, N), gen)
        mask[:, 0] = True
    elif kind == "bool_key":
        mask = bool_mask((B, 1, 1, N), gen)
    elif kind == "float_grad":
        mask = float_mask((1, 1, M, N), gen)
        mask[..., 4, :] = NEG_INF  # fully masked row
        mask[..., 6, ::3] = NEG_INF
        mask.requires_grad_(True)
    return q, k, v, mask, target


@pytest.mark.parametrize("case", case_params(CASES))
def test_matches_reference(backend, case):
    gen = make_gen("fused", case["id"], backend)
    q, k, v, mask, target = _case_inputs(case, gen)
    out, w, kl, grads = run_fused(backend, q, k, v, mask, target=target, is_causal=case.get("causal", False),
                                  scale=case.get("scale"), need_weights=case.get("weights", False),
                                  rows=case.get("rows"), gen=gen)
    if case.get("mask") == "bool":
        assert (kl[0, :, 3] == 0).all() and (kl[1, :, 2] == 0).all()
        assert (out[0, :, 3] == 0).all()
    if case.get("mask") == "float_grad":
        assert (kl[..., 4] == 0).all()
        assert grads["attn_mask"].shape == mask.shape
    if case["N"] == 1:
        assert (kl == 0).all()


@pytest.mark.skipif(not INTERPRETED, reason="forces the Triton kernels' exact-float32 split under the CPU interpreter")
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in CASES if c["id"] in DKDV_PARTS_3XTF32])
def test_matches_reference_3xtf32(case, monkeypatch):
    """The fused KL with GQA, causal masking or a 2-D mask through the exact-float32 path of CUDA
    devices (operands split into TF32 parts, multiplied exactly by the interpreter), dK/dV in two
    launches where the launcher splits them: every output and gradient against the float64
    references at float32 tolerances."""
    force_exact_fp32_split(monkeypatch)
    parts = record_dkdv_parts(monkeypatch)
    test_matches_reference("triton", case)
    assert parts == DKDV_PARTS_3XTF32[case["id"]]


# --------------------------------------------------------------------------------------------------
# Reductions (scalar weight on the KL), dtypes, loss on the KL only
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(backend, reduction):
    gen = make_gen("fused_red", backend, reduction)
    B, H, M, N = 2, 2, 6, 19
    q, k, v = make_qkv(B, H, 1, M, N, 16, gen=gen, requires_grad=True)
    mask = bool_mask((B, 1, 1, N), gen)
    _, _, kl, _ = run_fused(backend, q, k, v, mask, target=_target((B, 1, M, N), gen), reduction=reduction, gen=gen,
                            loss=("out", "kl"))
    assert kl.shape == ((B, H, M) if reduction == "none" else ())


def test_default_reduction_is_batchmean(backend):
    gen = make_gen("fused_default", backend)
    q, k, v = make_qkv(2, 2, 2, 5, 12, 16, gen=gen)
    target = _target((2, 1, 5, 12), gen)
    _, kl = interaction_attention(q, k, v, kl_target=target, backend=backend)
    _, rows = interaction_attention(q, k, v, kl_target=target, kl_reduction="none", backend=backend)
    torch.testing.assert_close(kl, rows.sum() / 2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_dtypes(backend, dtype):
    gen = make_gen("fused_dtypes", backend, DTYPE_IDS[dtype])
    B, H, M, N = 2, 2, 11, 26
    q, k, v = make_qkv(B, H, 1, M, N, 32, dtype=dtype, gen=gen, requires_grad=True)
    mask = bool_mask((B, 1, M, N), gen)
    mask[1, 0, 5] = False
    run_fused(backend, q, k, v, mask, target=_target((B, 1, M, N), gen).to(dtype), is_causal=True,
              need_weights=True, rows=(3, 9), gen=gen)


INTERPRETER_COST = ("rows of 150 keys, 4 heads, with and without causal per dtype (~10 s there); test_dtypes "
                    "covers Triton's dtypes")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(skip_interpreter=INTERPRETER_COST))
def test_long_rows_dtypes(backend, dtype, causal):
    """From the cuda backend's suite: rows of 150 keys (two key blocks of its CPU kernels), GQA 4:2, a
    row without an attended key, a row without target mass, t = 0 terms, maps of a row window; every
    dtype, with and without causal masking."""
    gen = make_gen("fused_long_rows", backend, DTYPE_IDS[dtype], causal)
    B, H, Hkv, M, N, D = 2, 4, 2, 19, 150, 32
    q, k, v = make_qkv(B, H, Hkv, M, N, D, dtype=dtype, gen=gen, requires_grad=True)
    mask = bool_mask((B, 1, M, N), gen, p_true=0.8)
    mask[0, 0, 3] = False  # a row without an attended key
    target = torch.rand(B, 1, M, N, generator=gen)
    target[1, 0, 7] = 0.0  # a row without target mass
    target[0, 0, 2, ::3] = 0.0  # t = 0 terms
    _, _, kl, _ = run_fused(backend, q, k, v, mask, target=target.to(DEVICE), is_causal=causal, need_weights=True,
                            rows=(4, 17), gen=gen)
    assert (kl[0, :, 3] == 0).all() and (kl[1, :, 7] == 0).all()


@pytest.mark.parametrize("with_weights", [False, True], ids=["kl", "kl+weights"])
def test_loss_on_kl_only(backend, with_weights):
    """Only the KL (and maybe the maps) enter the loss: out receives no gradient (None upstream)."""
    gen = make_gen("fused_kl_only", backend, with_weights)
    q, k, v = make_qkv(1, 2, 2, 9, 23, 16, gen=gen, requires_grad=True)
    loss = ("kl", "weights") if with_weights else ("kl",)
    _, _, _, grads = run_fused(backend, q, k, v, target=_target((1, 1, 9, 23), gen), need_weights=with_weights,
                               reduction="sum", gen=gen, loss=loss)
    assert (grads["v"] == 0).all(), "dv must be zero when only the KL / maps enter the loss"


# --------------------------------------------------------------------------------------------------
# Consistency with the standalone ops, 3-D inputs, no gradient to the target
# --------------------------------------------------------------------------------------------------

def test_same_as_attention_kl_qk(backend):
    """With a bool mask (and causal as a key mask), the fused KL equals attention_kl_qk(q, k, t,
    key_mask=attended keys), values and gradients."""
    gen = make_gen("fused_vs_qk", backend)
    B, H, M, N, D = 2, 2, 8, 19, 16
    q, k, v = make_qkv(B, H, 1, M, N, D, gen=gen, requires_grad=True)
    mask = bool_mask((B, 1, M, N), gen)
    target = _target((B, 1, M, N), gen)
    _, kl = interaction_attention(q, k, v, mask, is_causal=True, kl_target=target, kl_reduction="none",
                                  backend=backend)
    keep = mask & torch.ones(M, N, dtype=torch.bool, device=DEVICE).tril()
    kl2 = attention_kl_qk(q, k, target, key_mask=keep, reduction="none", backend=backend)
    torch.testing.assert_close(kl, kl2, atol=2e-5, rtol=2e-5)
    r = randn(kl.shape, gen)
    g1 = torch.autograd.grad(kl, (q, k), r)
    g2 = torch.autograd.grad(kl2, (q, k), r)
    for n, a, b in zip("qk", g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{n}: {m}")


@pytest.mark.parametrize("backend,tshape", backend_params(cases=["B1MN", "BMN"]))
def test_three_d_inputs(backend, tshape):
    """(B, L, D) inputs: out (B, M, Dv), kl (B, M). The target as (B, 1, M, N) and as (B, M, N)."""
    gen = make_gen("fused_3d", backend)
    B, M, N, D = 2, 7, 15, 16
    q, k, v = (randn((B, L, D), gen, requires_grad=True) for L in (M, N, N))
    target4 = _target((B, 1, M, N), gen)
    target = target4 if tshape == "B1MN" else target4.squeeze(1)
    out, kl = interaction_attention(q, k, v, kl_target=target, kl_reduction="none", backend=backend)
    assert out.shape == (B, M, D) and kl.shape == (B, M)
    q64, k64, v64 = detached64(q, k, v)
    want = ref_fused_kl_rows(q64.unsqueeze(1), k64.unsqueeze(1), target4).squeeze(1)
    assert_close(kl, want, torch.float32, grad=True, name="kl")
    r = randn(kl.shape, gen)
    for n, g, e in zip("qk", torch.autograd.grad(kl, (q, k), r), torch.autograd.grad(want, (q64, k64), r.double())):
        assert_close(g, e, torch.float32, grad=True, name=f"d{n}")
    _, bm = interaction_attention(q, k, v, kl_target=target, backend=backend)
    assert_close(bm, want.detach().sum() / B, torch.float32, grad=True, name="batchmean")


def test_no_gradient_to_target(backend):
    gen = make_gen("fused_no_target_grad", backend)
    q, k, v = make_qkv(1, 2, 2, 5, 12, 16, gen=gen, requires_grad=True)
    target = _target((1, 1, 5, 12), gen).requires_grad_(True)
    out, kl = interaction_attention(q, k, v, kl_target=target, backend=backend)
    grads = torch.autograd.grad(out.sum() + kl, (q, k, v, target), allow_unused=True)
    assert grads[3] is None or (grads[3] == 0).all()
    assert grads[0].abs().sum() > 0


def test_without_target_unchanged(backend):
    """kl_target=None keeps the old return types (a tensor, or (out, weights))."""
    gen = make_gen("fused_none", backend)
    q, k, v = make_qkv(1, 2, 2, 5, 12, 16, gen=gen)
    out = interaction_attention(q, k, v, backend=backend)
    assert isinstance(out, torch.Tensor)
    res = interaction_attention(q, k, v, need_weights=True, backend=backend)
    assert isinstance(res, tuple) and len(res) == 2
    out2, kl = interaction_attention(q, k, v, kl_target=_target((1, 1, 5, 12), gen), backend=backend)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# torch backend row chunks; dropout path
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_bytes", ["1", "3000"], ids=["1row", "few_rows"])
def test_torch_backend_row_chunks(monkeypatch, chunk_bytes):
    monkeypatch.setenv("LFI_TORCH_CHUNK_BYTES", chunk_bytes)
    gen = make_gen("fused_chunks", chunk_bytes)
    B, H, M, N = 2, 2, 13, 17
    q, k, v = make_qkv(B, H, 1, M, N, 16, gen=gen, requires_grad=True)
    mask = bool_mask((B, 1, M, N), gen)
    mask[0, 0, 6] = False
    run_fused("torch", q, k, v, mask, target=_target((B, 1, 1, N), gen), is_causal=True, need_weights=True,
              rows=(4, 11), gen=gen)


def test_dropout_kl_uses_maps_before_dropout(backend):
    """With dropout_p > 0 (eager fallback) the KL is computed on P before dropout: same values and
    gradients as the reference, whatever the dropout mask."""
    gen = make_gen("fused_dropout", backend)
    q, k, v = make_qkv(1, 2, 2, 6, 14, 16, gen=gen, requires_grad=True)
    mask = bool_mask((1, 1, 6, 14), gen)
    target = _target((1, 1, 6, 14), gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out, kl = interaction_attention(q, k, v, mask, dropout_p=0.3, kl_target=target, kl_reduction="none",
                                        backend=backend)
    q64, k64 = detached64(q, k)
    want = ref_fused_kl_rows(q64, k64, target, mask)
    assert_close(kl, want, torch.float32, grad=True, name="kl")
    r = randn(kl.shape, gen)
    for n, g, e in zip("qk", torch.autograd.grad(kl, (q, k), r), torch.autograd.grad(want, (q64, k64), r.double())):
        assert_close(g, e, torch.float32, grad=True, name=f"d{n}")


# --------------------------------------------------------------------------------------------------
# The custom ops with a kl_target: opcheck
# --------------------------------------------------------------------------------------------------

def test_opcheck(backend):
    gen = make_gen("fused_opcheck", backend)
    B, H, M, N, D = 2, 2, 5, 19, 16
    q, k, v = make_qkv(B, H, 1, M, N, D, gen=gen, requires_grad=True)
    mask = bool_mask((B, 1, M, N), gen)
    target = _target((B, 1, M, N), gen)
    fwd = torch.ops.lfi.interaction_attention_fwd.default
    named = dict(q=q, k=k, v=v, attn_mask=mask, scale=D ** -0.5, is_causal=True, weights_start=0, weights_stop=M,
                 kl_target=target, backend=backend)
    torch.library.opcheck(fwd, schema_args(fwd, named))
    out, stats, weights, kl, tnorm = fwd(*schema_args(fwd, named))
    assert kl.shape == tnorm.shape == (B, H, M)
    bwd = torch.ops.lfi.interaction_attention_bwd.default
    named.update(grad_out=randn(out.shape, gen), grad_weights=randn(weights.shape, gen), out=out, stats=stats,
                 mask_grad=False, tnorm=tnorm, grad_kl=randn((B, H, M), gen))
    torch.library.opcheck(bwd, schema_args(bwd, {n: (t.detach() if isinstance(t, torch.Tensor) else t)
                                                  for n, t in named.items()}))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

def _qkv():
    return make_qkv(2, 2, 2, 3, 8, 16, gen=make_gen("fused_err"))


ERROR_CASES = [
    ("kl_reduction_unknown", dict(kl_target=lambda: torch.rand(2, 1, 3, 8, device=DEVICE), kl_reduction="avg"),
     ValueError, r"reduction"),
    ("target_shape", dict(kl_target=lambda: torch.rand(2, 1, 3, 9, device=DEVICE)), ValueError, r"target"),
    ("target_heads", dict(kl_target=lambda: torch.rand(2, 3, 3, 8, device=DEVICE)), ValueError, r"target"),
    ("target_int", dict(kl_target=lambda: torch.ones(2, 1, 3, 8, dtype=torch.long, device=DEVICE)), TypeError,
     r"target"),
    ("target_not_tensor", dict(kl_target=lambda: [[0.5, 0.5]]), TypeError, r"target"),
    ("target_device", dict(kl_target=lambda: torch.empty(2, 1, 3, 8, device="meta")), ValueError, r"target"),
]


@pytest.mark.parametrize("over,exc,pattern", [pytest.param(o, e, p, id=i) for i, o, e, p in ERROR_CASES])
def test_errors(over, exc, pattern):
    q, k, v = _qkv()
    kw = {n: (x() if callable(x) else x) for n, x in over.items()}
    with pytest.raises(exc, match=pattern):
        interaction_attention(q, k, v, backend="torch", **kw)
