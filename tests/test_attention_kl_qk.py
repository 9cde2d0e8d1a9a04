"""Correctness of lfi.ops.attention_kl_qk: the attention KL with student logits scale * q k^T (and an
optional implicit teacher scale_t * q_t k_t^T) never materialized.

Compared on every usable backend against float64 references that *do* materialize the logits and
then use the F.log_softmax + F.kl_div reference of test_attention_kl.py (and its closed-form twin).
Gradients (to q and k only) against the reference autograd, and gradcheck in float64 on the torch
backend. Shapes stay small: under the Triton CPU interpreter every tile step costs milliseconds.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import (
    BACKENDS, DEVICE, DTYPE_IDS, assert_close, backend_supports, detached64, make_gen, randn,
)
from lfi.ops import attention_kl, attention_kl_qk
from test_attention_kl import (
    INTERPRETER_NOISE, REDUCTIONS, key_mask_of, make_target, ref_kl_rows, ref_kl_rows_direct, ref_reduce,
)

pytestmark = pytest.mark.filterwarnings(INTERPRETER_NOISE)


# --------------------------------------------------------------------------------------------------
# float64 references with materialized logits
# --------------------------------------------------------------------------------------------------

def ref_student_logits(q, k, scale=None):
    """scale * q k^T in float64, (B, H, M, N); query head h reads kv head h // (H // Hkv)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k64 = k.to(torch.float64).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return scale * torch.matmul(q.to(torch.float64), k64.transpose(-1, -2))


def ref_teacher_logits(q_t, k_t, scale_t=None):
    """scale_t * q_t k_t^T in float64, (B, Ht, M, N) (Ht = 1 broadcasts over the student's heads)."""
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    kt = k_t.detach().to(torch.float64).repeat_interleave(q_t.shape[1] // k_t.shape[1], dim=1)
    return scale_t * torch.matmul(q_t.detach().to(torch.float64), kt.transpose(-1, -2))


def ref_kl_qk_rows(q, k, target, *, scale=None, scale_t=None, target_is="probs", temperature=1.0, key_mask=None,
                   direct=False):
    s = ref_student_logits(q, k, scale)
    if isinstance(target, (tuple, list)):
        target, target_is = ref_teacher_logits(*target, scale_t), "logits"
    fn = ref_kl_rows_direct if direct else ref_kl_rows
    return fn(s, target, target_is, temperature, key_mask)


def check_kl_qk(backend, q, k, target, *, gen, dtype=None, upstream="random", **kw):
    """attention_kl_qk(reduction="none") vs both references on the same (rounded) inputs, and the
    gradients to q and k of a loss with a random upstream gradient. Returns (kl, dq, dk)."""
    dtype = dtype or q.dtype
    kl = attention_kl_qk(q, k, target, reduction="none", backend=backend, **kw)
    B, H, M, _ = q.shape
    assert kl.shape == (B, H, M)
    assert kl.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    q64, k64 = detached64(q, k)
    want = ref_kl_qk_rows(q64, k64, target, **kw)
    want_direct = ref_kl_qk_rows(q64, k64, target, direct=True, **kw)
    torch.testing.assert_close(want.detach(), want_direct, atol=1e-9 * max(1.0, want.abs().max().item()), rtol=1e-9)
    assert_close(kl, want, dtype, grad=True, name="kl rows")
    assert_close(kl, want_direct, dtype, grad=True, name="kl rows (direct formula)")
    inputs = [t for t in (q, k) if t.requires_grad]
    if not inputs:
        return kl, None, None
    r = randn(kl.shape, gen, kl.dtype, kl.device) if upstream == "random" else torch.ones_like(kl)
    got = torch.autograd.grad(kl, inputs, r)
    exp = torch.autograd.grad(want, [t64 for t, t64 in zip((q, k), (q64, k64)) if t.requires_grad], r.double())
    names = [n for n, t in zip("qk", (q, k)) if t.requires_grad]
    grads = {}
    for n, t, g, e in zip(names, inputs, got, exp):
        assert g.dtype == t.dtype and g.shape == t.shape, f"d{n}: {g.dtype} {tuple(g.shape)}"
        assert_close(g, e, dtype, grad=True, name=f"d{n}")
        grads[n] = g
    return kl, grads.get("q"), grads.get("k")


def _params(cases):
    return [pytest.param(c, id=c["id"]) for c in cases]


def _teacher(case, B, H, M, N, gen, dtype=torch.float32):
    """The target of a case: ('dense', shape, kind) or ('implicit', Ht, Htk, Dt)."""
    t = case["teacher"]
    if t[0] == "dense":
        shape = {"B1MN": (B, 1, M, N), "BHMN": (B, H, M, N), "111N": (1, 1, 1, N)}[t[1]]
        return make_target(shape, t[2], gen, dtype=dtype), t[2]
    _, Ht, Htk, Dt = t
    Ht = H if Ht == "H" else Ht
    Htk = H if Htk == "H" else Htk
    q_t = randn((B, Ht, M, Dt), gen, dtype)
    k_t = randn((B, Htk, N, Dt), gen, dtype)
    return (q_t, k_t), "logits"


# --------------------------------------------------------------------------------------------------
# Values and gradients: dense and implicit teachers, GQA, temperatures, scales, key masks
# --------------------------------------------------------------------------------------------------

CASES = [
    dict(id="dense_probs_B1MN_gqa4-2", B=2, H=4, Hkv=2, M=9, N=33, D=16, teacher=("dense", "B1MN", "probs"),
         T=1.0, mask="B11N"),
    dict(id="dense_logits_BHMN_gqa2-1_M20_N17_T2", B=1, H=2, Hkv=1, M=20, N=17, D=32,
         teacher=("dense", "BHMN", "logits"), T=2.0, mask=None),
    dict(id="dense_log_probs_111N_N70_T05", B=2, H=2, Hkv=2, M=5, N=70, D=16,
         teacher=("dense", "111N", "log_probs"), T=0.5, mask="11MN"),
    dict(id="implicit_Ht1_Htk1_Dt24_T2", B=2, H=4, Hkv=1, M=7, N=33, D=16, teacher=("implicit", 1, 1, 24),
         T=2.0, mask="11MN"),
    dict(id="implicit_HtH_HtkH_scales_T05", B=1, H=2, Hkv=2, M=11, N=40, D=24, teacher=("implicit", "H", "H", 16),
         T=0.5, mask="BHMN", scale=0.3, scale_t=0.45),
    dict(id="implicit_Ht4_Htk2_Dt8", B=1, H=4, Hkv=2, M=6, N=21, D=16, teacher=("implicit", "H", 2, 8),
         T=1.0, mask=None),
    dict(id="dense_probs_M1_N1", B=2, H=2, Hkv=1, M=1, N=1, D=16, teacher=("dense", "B1MN", "probs"), T=1.0,
         mask=None),
]


@pytest.mark.parametrize("case", _params(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case):
    gen = make_gen("klqk_cases", case["id"], backend)
    B, H, Hkv, M, N, D = (case[x] for x in ("B", "H", "Hkv", "M", "N", "D"))
    q = randn((B, H, M, D), gen, requires_grad=True, scale=1.5)
    k = randn((B, Hkv, N, D), gen, requires_grad=True, scale=1.5)
    target, target_is = _teacher(case, B, H, M, N, gen)
    kw = dict(temperature=case["T"], key_mask=key_mask_of(case["mask"], B, H, M, N, gen))
    if "scale" in case:
        kw["scale"] = case["scale"]
    if "scale_t" in case:
        kw["scale_t"] = case["scale_t"]
    if isinstance(target, torch.Tensor):
        kw["target_is"] = target_is
    check_kl_qk(backend, q, k, target, gen=gen, **kw)


@pytest.mark.parametrize("N", [1, 33, 70])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_key_counts(backend, N):
    gen = make_gen("klqk_oddN", backend, N)
    B, H, M, D = 1, 2, 9, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, 1, N, D), gen, requires_grad=True)
    check_kl_qk(backend, q, k, make_target((B, 1, M, N), "probs", gen), temperature=2.0, gen=gen)
    kl, _, _ = check_kl_qk(backend, q, k, (randn((B, 1, M, 8), gen), randn((B, 1, N, 8), gen)), gen=gen)
    if N == 1:
        assert (kl == 0).all()


def test_same_as_attention_kl_on_materialized_logits(backend):
    """attention_kl_qk(q, k, t) == attention_kl(scale * q k^T, t) for dense targets, and for an
    implicit teacher == attention_kl(student, scale_t * q_t k_t^T, target_is='logits')."""
    gen = make_gen("klqk_vs_kl", backend)
    B, H, Hkv, M, N, D = 2, 2, 1, 7, 35, 16
    q, k = randn((B, H, M, D), gen), randn((B, Hkv, N, D), gen)
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    logits = (ref_student_logits(q, k, 0.4)).float()
    target = make_target((B, 1, M, N), "logits", gen)
    a = attention_kl_qk(q, k, target, scale=0.4, target_is="logits", temperature=1.7, key_mask=key_mask,
                        reduction="none", backend=backend)
    b = attention_kl(logits, target, target_is="logits", temperature=1.7, key_mask=key_mask, reduction="none",
                     backend=backend)
    torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)
    q_t, k_t = randn((B, 1, M, 8), gen), randn((B, 1, N, 8), gen)
    a = attention_kl_qk(q, k, (q_t, k_t), scale=0.4, scale_t=0.6, temperature=1.7, key_mask=key_mask,
                        reduction="none", backend=backend)
    b = attention_kl(logits, ref_teacher_logits(q_t, k_t, 0.6).float(), target_is="logits", temperature=1.7,
                     key_mask=key_mask, reduction="none", backend=backend)
    torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_default_scales(backend):
    """scale defaults to D ** -0.5 and scale_t to Dt ** -0.5 (Dt != D)."""
    gen = make_gen("klqk_scales", backend)
    B, H, M, N, D, Dt = 1, 2, 5, 19, 16, 36
    q, k = randn((B, H, M, D), gen), randn((B, H, N, D), gen)
    q_t, k_t = randn((B, H, M, Dt), gen), randn((B, 1, N, Dt), gen)
    a = attention_kl_qk(q, k, (q_t, k_t), reduction="none", backend=backend)
    b = attention_kl_qk(q, k, (q_t, k_t), scale=D ** -0.5, scale_t=Dt ** -0.5, reduction="none", backend=backend)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert_close(a, ref_kl_qk_rows(q.double(), k.double(), (q_t, k_t)), torch.float32, grad=True, name="kl")


# --------------------------------------------------------------------------------------------------
# Reductions x {dense, implicit}, with a scalar weight on the loss (grad_output != 1)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["dense", "implicit"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend, reduction, teacher):
    gen = make_gen("klqk_red", backend, reduction, teacher)
    B, H, Hkv, M, N, D = 2, 2, 1, 5, 24, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, requires_grad=True)
    target = make_target((B, 1, M, N), "probs", gen) if teacher == "dense" else \
        (randn((B, 1, M, 8), gen), randn((B, 1, N, 8), gen))
    T = {"none": 1.0, "sum": 0.5, "mean": 2.0, "batchmean": 1.0}[reduction]
    loss = attention_kl_qk(q, k, target, temperature=T, reduction=reduction, backend=backend)
    q64, k64 = detached64(q, k)
    want = ref_reduce(ref_kl_qk_rows(q64, k64, target, temperature=T), reduction, B)
    assert loss.shape == want.shape and loss.dtype == torch.float32
    assert_close(loss, want, torch.float32, grad=True, name=f"kl {reduction}")
    weight = 2.5 if reduction != "none" else randn(loss.shape, gen)
    got = torch.autograd.grad((loss * weight).sum(), (q, k))
    w64 = weight if isinstance(weight, float) else weight.double()
    exp = torch.autograd.grad((want * w64).sum(), (q64, k64))
    for n, g, e in zip("qk", got, exp):
        assert_close(g, e, torch.float32, grad=True, name=f"d{n}")


# --------------------------------------------------------------------------------------------------
# dtypes (fp16/bf16 inputs, fp32 accumulation; fp64 on torch), mixed teacher dtype
# --------------------------------------------------------------------------------------------------

def _dtype_params():
    out = []
    for backend in BACKENDS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            if backend_supports(backend, dtype):
                for teacher in ("dense", "implicit"):
                    out.append(pytest.param(backend, dtype, teacher, id=f"{backend}-{DTYPE_IDS[dtype]}-{teacher}"))
    return out


@pytest.mark.parametrize("backend,dtype,teacher", _dtype_params())
def test_dtypes(backend, dtype, teacher):
    gen = make_gen("klqk_dtypes", backend, DTYPE_IDS[dtype], teacher)
    B, H, Hkv, M, N, D = 2, 2, 1, 9, 37, 32
    q = randn((B, H, M, D), gen, dtype, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, dtype, requires_grad=True)
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    if teacher == "dense":
        check_kl_qk(backend, q, k, make_target((B, 1, M, N), "logits", gen, dtype=dtype), target_is="logits",
                    temperature=1.5, key_mask=key_mask, gen=gen)
    else:
        target = (randn((B, 1, M, 16), gen, dtype), randn((B, 1, N, 16), gen, dtype))
        check_kl_qk(backend, q, k, target, temperature=1.5, key_mask=key_mask, gen=gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_low_precision_student_fp32_teacher(backend, dtype):
    """A float32 implicit teacher (e.g. CLIP embeddings) with a float16/bfloat16 student."""
    gen = make_gen("klqk_mixed", backend, DTYPE_IDS[dtype])
    B, H, M, N = 1, 2, 7, 30
    q = randn((B, H, M, 16), gen, dtype, requires_grad=True)
    k = randn((B, H, N, 16), gen, dtype, requires_grad=True)
    check_kl_qk(backend, q, k, (randn((B, 1, M, 24), gen), randn((B, 1, N, 24), gen)), gen=gen)


# --------------------------------------------------------------------------------------------------
# Numerics: huge logits, zeros in the target, fully masked rows
# --------------------------------------------------------------------------------------------------

def _offset_pair(B, Hq, Hk, M, N, D, gen):
    """q (B, Hq, M, D), k (B, Hk, N, D) whose products are a per-row offset ~1e4 (q_0 * k_0 with
    k_0 = 100 for every key) plus O(1) differences: many keys share the softmax mass."""
    q = randn((B, Hq, M, D), gen)
    k = randn((B, Hk, N, D), gen)
    q[..., 0] = 100.0 + randn((B, Hq, M), gen, scale=10.0)
    k[..., 0] = 100.0
    return q, k


LARGE_CASES = [
    dict(id="student_offset1e4_dense_probs", student="offset", teacher="dense_probs"),
    dict(id="student_onehot1e4_dense_probs", student="big", teacher="dense_probs"),
    dict(id="student_offset1e4_implicit_small", student="offset", teacher="implicit_small"),
    dict(id="teacher_offset1e4_implicit", student="small", teacher="implicit_offset"),
]


@pytest.mark.parametrize("case", _params(LARGE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stable(backend, case):
    """Student and/or teacher logits ~1e4 (explicit scales 1): finite loss and gradients.

    The kernels form q.k in fp32, so each logit of size ~1e4 carries a rounding error of about an ulp
    of 1e4 (~1e-3) that no fp32 algorithm avoids; the tolerances are a few such ulps, propagated
    (KL: / T; gradients: times the other operand's size). Precision lost *beyond* the logits'
    rounding is tested with exact logits in test_attention_kl.py::test_large_logits_stable."""
    gen = make_gen("klqk_large", backend, case["id"])
    B, H, M, N, D = 1, 2, 5, 33, 16
    if case["student"] == "offset":
        q, k = _offset_pair(B, H, 1, M, N, D, gen)
    elif case["student"] == "big":
        q, k = randn((B, H, M, D), gen, scale=30.0), randn((B, 1, N, D), gen, scale=30.0)
    else:
        q, k = randn((B, H, M, D), gen), randn((B, 1, N, D), gen)
    q.requires_grad_(True)
    k.requires_grad_(True)
    if case["teacher"] == "dense_probs":
        target, kw = make_target((B, 1, M, N), "probs", gen), dict(scale=1.0, temperature=2.0)
    elif case["teacher"] == "implicit_small":
        target, kw = (randn((B, 1, M, 8), gen), randn((B, 1, N, 8), gen)), dict(scale=1.0, temperature=2.0)
    else:
        target = _offset_pair(B, 1, 1, M, N, 8, gen)
        kw = dict(scale=1.0, scale_t=1.0, temperature=2.0)
    kl = attention_kl_qk(q, k, target, reduction="none", backend=backend, **kw)
    q64, k64 = detached64(q, k)
    want = ref_kl_qk_rows(q64, k64, target, **kw)
    big = ref_student_logits(q64, k64, 1.0).abs().max().item()
    if isinstance(target, tuple):
        big = max(big, ref_teacher_logits(*target, kw.get("scale_t")).abs().max().item())
    assert big > 1e3
    assert torch.isfinite(kl).all()
    ulp = 2.0 ** (math.floor(math.log2(big)) - 23)
    kl_scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(kl.double(), want.detach(), atol=8 * ulp / kw["temperature"] * kl_scale, rtol=1e-5)
    r = randn(kl.shape, gen)
    got = torch.autograd.grad(kl, (q, k), r)
    exp = torch.autograd.grad(want, (q64, k64), r.double())
    for g, e, other in zip(got, exp, (k, q)):
        assert torch.isfinite(g).all()
        # dS error of a few ulps of the logits, times sum_j |k_j| (resp. sum_i |q_i|)
        tol = 4 * ulp * r.abs().max().item() * other.detach().abs().sum(-2).max().item()
        torch.testing.assert_close(g.double(), e, atol=max(tol, 1e-4 * e.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_and_zero_mass(backend):
    gen = make_gen("klqk_masked", backend)
    B, H, Hkv, M, N, D = 2, 2, 1, 6, 35, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, requires_grad=True)
    key_mask = torch.rand(B, 1, M, N, generator=gen) < 0.6
    key_mask[..., 0] = True
    key_mask[0, 0, 2] = False
    key_mask = key_mask.to(DEVICE)
    target = make_target((B, 1, M, N), "probs", gen)
    target[1, 0, 4] = 0.0
    target[0, 0, 1, ::3] = 0.0
    kl, dq, _ = check_kl_qk(backend, q, k, target, key_mask=key_mask, gen=gen)
    assert (kl[0, :, 2] == 0).all() and (kl[1, :, 4] == 0).all()
    assert (dq[0, :, 2] == 0).all() and (dq[1, :, 4] == 0).all()
    # implicit teacher: only the fully masked rows are zero
    kl, dq, _ = check_kl_qk(backend, q, k, (randn((B, 1, M, 8), gen), randn((B, 1, N, 8), gen)), key_mask=key_mask,
                            gen=gen)
    assert (kl[0, :, 2] == 0).all() and (dq[0, :, 2] == 0).all()


# --------------------------------------------------------------------------------------------------
# Gradients: gradcheck (float64, torch), no gradient to the teacher
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["dense_probs", "dense_logits", "implicit"])
def test_gradcheck_torch_fp64(teacher):
    gen = make_gen("klqk_gradcheck", teacher)
    B, H, Hkv, M, N, D = 1, 2, 1, 3, 6, 4
    q = randn((B, H, M, D), gen, torch.float64, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, torch.float64, requires_grad=True)
    key_mask = torch.rand(B, 1, M, N, generator=gen) < 0.7
    key_mask[..., 0] = True
    key_mask[0, 0, 1] = False
    key_mask = key_mask.to(DEVICE)
    kw = dict(temperature=1.3, key_mask=key_mask, reduction="sum", backend="torch")
    if teacher == "implicit":
        target = (randn((B, 1, M, 3), gen, torch.float64), randn((B, 1, N, 3), gen, torch.float64))
    else:
        target = make_target((B, 1, M, N), teacher.split("_")[1], gen, dtype=torch.float64)
        kw["target_is"] = teacher.split("_")[1]

    def fn(q_, k_):
        return attention_kl_qk(q_, k_, target, **kw)

    assert torch.autograd.gradcheck(fn, (q, k), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_no_gradient_to_teacher(backend):
    gen = make_gen("klqk_no_teacher_grad", backend)
    B, H, M, N, D = 1, 2, 4, 20, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, H, N, D), gen, requires_grad=True)
    target = make_target((B, 1, M, N), "probs", gen).requires_grad_(True)
    q_t = randn((B, 1, M, 8), gen, requires_grad=True)
    k_t = randn((B, 1, N, 8), gen, requires_grad=True)
    for tgt, extra in ((target, (target,)), ((q_t, k_t), (q_t, k_t))):
        loss = attention_kl_qk(q, k, tgt, backend=backend)
        grads = torch.autograd.grad(loss, (q, k) + extra, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
        for g in grads[2:]:
            assert g is None or (g == 0).all(), "the teacher must not receive a gradient"


@pytest.mark.parametrize("which", ["q", "k"])
def test_partial_requires_grad(backend, which):
    gen = make_gen("klqk_partial", backend, which)
    q = randn((1, 2, 5, 16), gen, requires_grad=which == "q")
    k = randn((1, 1, 21, 16), gen, requires_grad=which == "k")
    check_kl_qk(backend, q, k, make_target((1, 1, 5, 21), "probs", gen), gen=gen)


# --------------------------------------------------------------------------------------------------
# Layouts: strided q / k (packed projections), expanded batch, broadcast masks
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["packed_qkv", "expanded_batch_k"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous(backend, layout):
    gen = make_gen("klqk_noncontig", backend, layout)
    B, H, M, D = 2, 2, 9, 16
    if layout == "packed_qkv":
        base = [randn((B, M, 3, H, D), gen, requires_grad=True)]
        q, k, _ = base[0].permute(2, 0, 3, 1, 4).unbind(0)
        N = M
    else:
        N = 26
        base = [randn((B, H, M, D), gen, requires_grad=True), randn((1, 1, N, D), gen, requires_grad=True)]
        q, k = base[0], base[1].expand(B, 1, N, D)
    # a teacher with strided q_t (column-major storage) and k_t (heads not outermost)
    target = (randn((B, 1, 8, M), gen).transpose(-1, -2), randn((B, N, 1, 8), gen).transpose(1, 2))
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    kl = attention_kl_qk(q, k, target, reduction="none", key_mask=key_mask, temperature=0.5, backend=backend)
    bases64 = detached64(*base)
    if layout == "packed_qkv":
        q64, k64, _ = bases64[0].permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q64, k64 = bases64[0], bases64[1].expand(B, 1, N, D)
    want = ref_kl_qk_rows(q64, k64, target, key_mask=key_mask, temperature=0.5)
    assert_close(kl, want, torch.float32, grad=True, name="kl rows")
    r = randn(kl.shape, gen)
    got = torch.autograd.grad(kl, base, r)
    exp = torch.autograd.grad(want, bases64, r.double())
    for g, e in zip(got, exp):
        assert_close(g, e, torch.float32, grad=True, name="grad")


# --------------------------------------------------------------------------------------------------
# Memory: the torch backend works in row chunks of at most LFI_TORCH_CHUNK_BYTES
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["dense", "implicit"])
@pytest.mark.parametrize("chunk_bytes", [1, 6000], ids=["1row", "few_rows"])
def test_torch_backend_row_chunks(monkeypatch, chunk_bytes, teacher):
    """With a small LFI_TORCH_CHUNK_BYTES the torch backend still matches the reference, and never
    builds a logits block larger than the chunk (the full (M, N) map is never materialized)."""
    from lfi.backends.reference import attention_kl_qk as ref_backend
    from lfi.backends.reference._common import chunk_rows

    monkeypatch.setenv("LFI_TORCH_CHUNK_BYTES", str(chunk_bytes))
    seen = []
    orig = ref_backend._logits

    def spy(q_rows, k, scale):
        out = orig(q_rows, k, scale)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(ref_backend, "_logits", spy)
    gen = make_gen("klqk_chunks", chunk_bytes, teacher)
    B, H, Hkv, M, N, D = 2, 2, 1, 23, 19, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, requires_grad=True)
    target = make_target((B, 1, M, N), "probs", gen) if teacher == "dense" else \
        (randn((B, 1, M, 8), gen), randn((B, 1, N, 8), gen))
    check_kl_qk("torch", q, k, target, key_mask=key_mask_of("11MN", B, H, M, N, gen), temperature=2.0, gen=gen)
    step = chunk_rows(B, H, M, N, 4)
    assert step < M, "the test must exercise several chunks"
    assert seen, "the torch backend did not compute logits through _logits"
    assert max(s[2] for s in seen) <= step, f"row chunks larger than the budget allows: {sorted(set(seen))}"
    assert all(math.prod(s) < B * H * M * N for s in seen), "a full (B, H, M, N) logits map was built"


# --------------------------------------------------------------------------------------------------
# The custom ops: opcheck
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["dense", "implicit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, teacher):
    gen = make_gen("klqk_opcheck", backend, teacher)
    B, H, Hkv, M, N, D = 2, 2, 1, 5, 20, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, requires_grad=True)
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    if teacher == "dense":
        tgt, q_t, k_t, is_logits = make_target((B, 1, M, N), "probs", gen), None, None, False
    else:
        tgt, q_t, k_t, is_logits = None, randn((B, 1, M, 8), gen), randn((B, 1, N, 8), gen), True
    args = (q, k, tgt, q_t, k_t, key_mask, 0.25 / 1.5, 0.35 / 1.5, is_logits, backend)
    op = torch.ops.lfi.attention_kl_qk_fwd.default
    torch.library.opcheck(op, args)
    kl, stats, tstats = op(*args)
    assert kl.shape == (B, H, M) and stats.shape == tstats.shape == (B, H, M, 2) and kl.dtype == torch.float32
    g = randn((B, H, M), gen)
    torch.library.opcheck(torch.ops.lfi.attention_kl_qk_bwd.default,
                          (g, q.detach(), k.detach(), tgt, q_t, k_t, key_mask, stats, tstats, *args[6:]))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

EB, EH, EM, EN, ED = 2, 2, 3, 8, 16


def _x(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)


def _err(**over):
    def build():
        kw = dict(q=_x(EB, EH, EM, ED), k=_x(EB, 1, EN, ED), target=torch.softmax(_x(EB, 1, EM, EN), -1))
        kw.update({k: (v() if callable(v) else v) for k, v in over.items()})
        return kw
    return build


def _pair(qt_shape, kt_shape, qt_dtype=torch.float32, kt_dtype=torch.float32):
    return lambda: (_x(*qt_shape, dtype=qt_dtype), _x(*kt_shape, dtype=kt_dtype))


ERROR_CASES = [
    ("q_3d", _err(q=lambda: _x(EB, EM, ED)), ValueError, r"\bq\b"),
    ("q_not_tensor", _err(q=[[1.0]]), TypeError, r"\bq\b"),
    ("k_int", _err(k=lambda: _x(EB, 1, EN, ED).long()), TypeError, r"\bk\b"),
    ("k_head_dim", _err(k=lambda: _x(EB, 1, EN, ED + 1)), ValueError, r"\bk\b"),
    ("k_batch", _err(k=lambda: _x(EB + 1, 1, EN, ED)), ValueError, r"\bk\b"),
    ("heads_not_divisible", _err(q=lambda: _x(EB, 3, EM, ED), k=lambda: _x(EB, 2, EN, ED),
                                 target=lambda: torch.rand(EB, 1, EM, EN, device=DEVICE)), ValueError, r"H"),
    ("qk_dtype", _err(k=lambda: _x(EB, 1, EN, ED, dtype=torch.float16)), TypeError, r"dtype"),
    ("target_shape", _err(target=lambda: torch.rand(EB, 1, EM, EN + 1, device=DEVICE)), ValueError, r"target"),
    ("target_heads", _err(target=lambda: torch.rand(EB, 3, EM, EN, device=DEVICE)), ValueError, r"target"),
    ("target_int", _err(target=lambda: torch.ones(EB, 1, EM, EN, dtype=torch.long, device=DEVICE)), TypeError,
     r"target"),
    ("target_not_tensor", _err(target="probs"), TypeError, r"target"),
    ("target_negative", _err(target=lambda: torch.rand(EB, 1, EM, EN, device=DEVICE) - 0.5), ValueError,
     r"(?i)negative"),
    ("target_device", _err(target=lambda: torch.empty(EB, 1, EM, EN, device="meta")), ValueError, r"target"),
    ("target_triple", _err(target=lambda: (_x(EB, 1, EM, 4), _x(EB, 1, EN, 4), _x(1))), ValueError,
     r"\(q_t, k_t\)"),
    ("q_t_batch", _err(target=_pair((EB + 1, 1, EM, 4), (EB, 1, EN, 4))), ValueError, r"q_t"),
    ("q_t_heads", _err(target=_pair((EB, 3, EM, 4), (EB, 1, EN, 4))), ValueError, r"q_t"),
    ("q_t_rows", _err(target=_pair((EB, 1, EM + 1, 4), (EB, 1, EN, 4))), ValueError, r"q_t"),
    ("q_t_3d", _err(target=_pair((EB, EM, 4), (EB, 1, EN, 4))), ValueError, r"q_t"),
    ("k_t_keys", _err(target=_pair((EB, 1, EM, 4), (EB, 1, EN + 1, 4))), ValueError, r"k_t"),
    ("k_t_dim", _err(target=_pair((EB, 1, EM, 4), (EB, 1, EN, 5))), ValueError, r"k_t"),
    ("k_t_batch", _err(target=_pair((EB, 1, EM, 4), (EB + 1, 1, EN, 4))), ValueError, r"k_t"),
    ("teacher_heads_not_divisible", _err(target=_pair((EB, EH, EM, 4), (EB, 3, EN, 4))), ValueError, r"Htk|heads"),
    ("teacher_dtypes", _err(target=_pair((EB, 1, EM, 4), (EB, 1, EN, 4), kt_dtype=torch.float16)), TypeError,
     r"q_t"),
    ("q_t_int", _err(target=lambda: (_x(EB, 1, EM, 4).long(), _x(EB, 1, EN, 4))), TypeError, r"q_t"),
    ("k_t_not_tensor", _err(target=lambda: (_x(EB, 1, EM, 4), None)), TypeError, r"k_t"),
    ("teacher_device", _err(target=lambda: (_x(EB, 1, EM, 4, device="meta"), _x(EB, 1, EN, 4, device="meta"))),
     TypeError, r"q_t"),
    ("scale_t_with_dense", _err(scale_t=0.5), ValueError, r"scale_t"),
    ("reduction", _err(reduction="avg"), ValueError, r"reduction"),
    ("target_is", _err(target_is="probabilities"), ValueError, r"target_is"),
    ("temperature", _err(temperature=0), ValueError, r"temperature"),
    ("temperature_negative", _err(temperature=-2.0), ValueError, r"temperature"),
    ("key_mask_dtype", _err(key_mask=lambda: torch.ones(EN, dtype=torch.uint8, device=DEVICE)), TypeError,
     r"key_mask"),
    ("key_mask_shape", _err(key_mask=lambda: torch.ones(EB, 1, EM + 1, EN, dtype=torch.bool, device=DEVICE)),
     ValueError, r"key_mask"),
    ("backend", _err(backend="jax"), ValueError, r"backend"),
    ("validate", _err(target=lambda: torch.rand(EB, 1, EM, EN, device=DEVICE) * 3, validate=True), ValueError,
     r"validate"),
]


@pytest.mark.parametrize("build,exc,pattern", [pytest.param(b, e, p, id=i) for i, b, e, p in ERROR_CASES])
def test_errors(build, exc, pattern):
    kw = build()
    with pytest.raises(exc, match=pattern):
        attention_kl_qk(kw.pop("q"), kw.pop("k"), kw.pop("target"), **kw)


def check_huge_magnitude_rows_qk(backend, where, device=DEVICE):
    """A query row whose logits (student's or implicit teacher's) are all -1e30 (a constant key
    component times a huge query entry): the row is a uniform distribution, and the backward must
    see it as one. Folding the row statistics into one logsumexp made p = 1 (or t = 1) per key."""
    gen = make_gen("kl_qk_huge", backend, where)
    B, H, M, N, D, Dt = 1, 2, 4, 21, 16, 8
    q, k = randn((B, H, M, D), gen, device=device), randn((B, 1, N, D), gen, device=device)
    q_t, k_t = randn((B, 1, M, Dt), gen, device=device), randn((B, 1, N, Dt), gen, device=device)
    if where == "student":
        k[..., 0] = 1.0
        q[0, 1, 2, 0] = -1e30 * D ** 0.5
    else:
        k_t[..., 0] = 1.0
        q_t[0, 0, 2, 0] = -1e30 * Dt ** 0.5
    q.requires_grad_(True)
    kl = attention_kl_qk(q, k, (q_t, k_t), reduction="none", backend=backend)
    q64 = q.detach().double().requires_grad_(True)
    s64 = ref_student_logits(q64, k)
    u64 = ref_teacher_logits(q_t, k_t)
    assert bool((s64[0, 1, 2] == s64[0, 1, 2, 0]).all()) if where == "student" else bool(
        (u64[0, 0, 2] == u64[0, 0, 2, 0]).all())
    t64 = torch.softmax(u64, -1)
    want = (t64 * (torch.log_softmax(u64, -1) - torch.log_softmax(s64, -1))).sum(-1)
    torch.testing.assert_close(kl.double(), want.detach(), atol=1e-5, rtol=1e-5)
    r = randn(kl.shape, gen, device=device)
    (got,) = torch.autograd.grad(kl, q, r)
    (exp,) = torch.autograd.grad(want, q64, r.double())
    assert torch.isfinite(got).all()
    # the huge row's own dq is ~0 (uniform p against the teacher), the others are O(1)
    torch.testing.assert_close(got.double(), exp, atol=1e-5 * exp.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_magnitude_rows(backend, where):
    check_huge_magnitude_rows_qk(backend, where)
