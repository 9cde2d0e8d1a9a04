"""Correctness of lfi.ops.attention_kl (KL(target || softmax(logits / T)) per attention row).

Every backend usable here (torch; triton on CUDA or under TRITON_INTERPRET=1) is compared, over whole
tensors, against two independent float64 references computed from the same (rounded) inputs:

* ``ref_kl_rows``: ``F.log_softmax`` + ``F.kl_div(..., reduction="none").sum(-1)``, with the key
  mask and the renormalisation of both distributions over the kept keys done by hand;
* ``ref_kl_rows_direct``: the closed form ``sum_j t_j log t_j - sum_j t_j s_j + lse(s)``.

Gradients are compared against torch.autograd through ``ref_kl_rows`` (and checked with gradcheck
in float64 on the torch backend). The reference helpers here are also used by
test_attention_kl_qk.py and test_fused_kl.py.

Shapes stay small: under the Triton CPU interpreter every tile step costs milliseconds.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    BACKENDS, DEVICE, DTYPE_IDS, assert_close, backend_supports, detached64, make_gen, randn,
)
from lfi.ops import attention_kl

NEG_INF = float("-inf")
REDUCTIONS = ["none", "sum", "mean", "batchmean"]

# The Triton CPU interpreter evaluates masked-off lanes too (numpy warns on -inf - -inf there); the
# results are checked element by element for NaN / inf, so the warnings are noise.
INTERPRETER_NOISE = "ignore:invalid value encountered:RuntimeWarning"
pytestmark = pytest.mark.filterwarnings(INTERPRETER_NOISE)
TARGET_KINDS = ["probs", "logits", "log_probs"]


# --------------------------------------------------------------------------------------------------
# float64 references (shared with the other KL test modules)
# --------------------------------------------------------------------------------------------------

def _keep(key_mask, shape, device):
    if key_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    km = key_mask.to(device)
    return km.reshape((1,) * (len(shape) - km.dim()) + tuple(km.shape)).expand(shape)


def ref_target_probs(target, shape, target_is="probs", temperature=1.0, key_mask=None):
    """The target distribution (float64, detached) over the kept keys, renormalised there; all zeros
    on rows with no kept key or no target mass."""
    keep = _keep(key_mask, shape, target.device)
    t = target.detach().to(torch.float64)
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape)).expand(shape)
    if target_is == "probs":
        t = torch.where(keep, t, torch.zeros_like(t))
        mass = t.sum(-1, keepdim=True)
        return torch.where(mass > 0, t / torch.where(mass > 0, mass, torch.ones_like(mass)), torch.zeros_like(t))
    u = t / temperature if target_is == "logits" else t
    row_ok = keep.any(-1, keepdim=True)
    u = torch.where(row_ok, u.masked_fill(~keep, NEG_INF), torch.zeros_like(u))
    p = torch.softmax(u, -1)
    return torch.where(keep & row_ok, p, torch.zeros_like(p))


def ref_student_log_probs(s, key_mask=None):
    """log softmax(s) over the kept keys (float64, differentiable); 0 at dropped keys and on rows with
    no kept key, so that every later product stays finite."""
    keep = _keep(key_mask, s.shape, s.device)
    row_ok = keep.any(-1, keepdim=True)
    s_m = torch.where(row_ok, s.masked_fill(~keep, NEG_INF), torch.zeros_like(s))
    logp = F.log_softmax(s_m, dim=-1)
    return torch.where(keep & row_ok, logp, torch.zeros_like(logp))


def ref_kl_rows(logits, target, target_is="probs", temperature=1.0, key_mask=None):
    """Per-row KL(t || softmax(logits / T)) via F.kl_div, float64, differentiable w.r.t. logits."""
    s = logits.to(torch.float64) / temperature
    t = ref_target_probs(target, s.shape, target_is, temperature, key_mask)
    logp = ref_student_log_probs(s, key_mask)
    return F.kl_div(logp, t, reduction="none").sum(-1)


def ref_kl_rows_direct(logits, target, target_is="probs", temperature=1.0, key_mask=None):
    """Per-row KL by the closed form sum t log t - sum t s + lse(s) over the kept keys (float64)."""
    s = logits.detach().to(torch.float64) / temperature
    keep = _keep(key_mask, s.shape, s.device)
    t = ref_target_probs(target, s.shape, target_is, temperature, key_mask)
    s_m = s.masked_fill(~keep, NEG_INF)
    lse = torch.logsumexp(s_m, -1)
    has_mass = t.sum(-1) > 0
    lse = torch.where(has_mass, lse, torch.zeros_like(lse))
    ts = torch.where(keep, t * s, torch.zeros_like(s)).sum(-1)
    return torch.xlogy(t, t).sum(-1) - ts + lse


def ref_reduce(rows, reduction, batch):
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / rows.numel()
    assert reduction == "batchmean"
    return total / batch


def make_target(shape, target_is, gen, dtype=torch.float32, device=DEVICE, normalized=True):
    """A teacher tensor of the given kind: probabilities (rows summing to 1 unless normalized=False),
    logits or log-probabilities."""
    if target_is == "probs":
        t = torch.rand(*shape, generator=gen, dtype=torch.float32) + 0.01
        if normalized:
            t = t / t.sum(-1, keepdim=True)
    elif target_is == "logits":
        t = torch.randn(*shape, generator=gen, dtype=torch.float32) * 2.0
    else:
        t = torch.log_softmax(torch.randn(*shape, generator=gen, dtype=torch.float32) * 2.0, -1)
    return t.to(device=device, dtype=dtype)


def key_mask_of(kind, B, H, M, N, gen, device=DEVICE):
    """Key masks in several broadcast shapes (True = keep)."""
    if kind is None:
        return None
    shapes = {"N": (N,), "B11N": (B, 1, 1, N), "11MN": (1, 1, M, N), "BHMN": (B, H, M, N), "1H1N": (1, H, 1, N)}
    mask = torch.rand(*shapes[kind], generator=gen) < 0.7
    mask[..., 0] = True  # at least one kept key in (nearly) every row; fully masked rows are tested apart
    return mask.to(device)


def check_kl(backend, logits, target, *, target_is="probs", temperature=1.0, key_mask=None, gen,
             dtype=None, upstream="random"):
    """attention_kl(reduction="none") against both float64 references (same rounded inputs), and the
    gradient of a loss with a random (or all-ones) upstream gradient against the reference autograd.
    Returns (per-row kl, dlogits)."""
    dtype = dtype or logits.dtype
    kl = attention_kl(logits, target, target_is=target_is, temperature=temperature, reduction="none",
                      key_mask=key_mask, backend=backend)
    assert kl.shape == logits.shape[:-1]
    assert kl.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert kl.device == logits.device
    (lg64,) = detached64(logits)
    want = ref_kl_rows(lg64, target, target_is, temperature, key_mask)
    want_direct = ref_kl_rows_direct(lg64, target, target_is, temperature, key_mask)
    torch.testing.assert_close(want, want_direct, atol=1e-9 * max(1.0, want.abs().max().item()), rtol=1e-9)
    assert_close(kl, want, dtype, grad=True, name="kl rows")
    assert_close(kl, want_direct, dtype, grad=True, name="kl rows (direct formula)")
    if not logits.requires_grad:
        return kl, None
    r = randn(kl.shape, gen, kl.dtype, kl.device) if upstream == "random" else torch.ones_like(kl)
    (got,) = torch.autograd.grad(kl, logits, r)
    (exp,) = torch.autograd.grad(want, lg64, r.double())
    assert got.dtype == logits.dtype and got.shape == logits.shape
    assert_close(got, exp, dtype, grad=True, name="dlogits")
    return kl, got


def _params(cases):
    return [pytest.param(c, id=c["id"]) for c in cases]


# --------------------------------------------------------------------------------------------------
# Per-row values and gradients: shapes, target kinds, temperatures, broadcasting, key masks
# --------------------------------------------------------------------------------------------------

CASES = [
    dict(id="probs_B1MN_T1", B=2, H=2, M=5, N=37, tshape="B1MN", target_is="probs", T=1.0, mask=None),
    dict(id="probs_BHMN_T05_M20_N17", B=1, H=2, M=20, N=17, tshape="BHMN", target_is="probs", T=0.5, mask=None),
    dict(id="probs_111N_T2_keymaskB11N", B=2, H=2, M=6, N=40, tshape="111N", target_is="probs", T=2.0,
         mask="B11N"),
    dict(id="probs_unnormalized_keymask11MN", B=1, H=2, M=9, N=33, tshape="B1MN", target_is="probs", T=1.0,
         mask="11MN", normalized=False),
    dict(id="logits_B1MN_T2_keymaskBHMN", B=2, H=2, M=7, N=33, tshape="B1MN", target_is="logits", T=2.0,
         mask="BHMN"),
    dict(id="logits_BHMN_T05_keymaskN", B=1, H=3, M=4, N=70, tshape="BHMN", target_is="logits", T=0.5, mask="N"),
    dict(id="log_probs_B1MN_T2", B=2, H=2, M=5, N=21, tshape="B1MN", target_is="log_probs", T=2.0, mask=None),
    dict(id="log_probs_MN_T05_keymask1H1N", B=1, H=2, M=17, N=9, tshape="MN", target_is="log_probs", T=0.5,
         mask="1H1N"),
    dict(id="probs_M1_N1", B=2, H=2, M=1, N=1, tshape="BHMN", target_is="probs", T=1.0, mask=None),
    dict(id="logits_M3_N70_111N", B=2, H=1, M=3, N=70, tshape="111N", target_is="logits", T=1.0, mask="B11N"),
]

_TSHAPES = {"B1MN": lambda B, H, M, N: (B, 1, M, N), "BHMN": lambda B, H, M, N: (B, H, M, N),
            "111N": lambda B, H, M, N: (1, 1, 1, N), "MN": lambda B, H, M, N: (M, N)}


@pytest.mark.parametrize("case", _params(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case):
    gen = make_gen("kl_cases", case["id"], backend)
    B, H, M, N = (case[x] for x in "BHMN")
    logits = randn((B, H, M, N), gen, requires_grad=True, scale=2.0)
    target = make_target(_TSHAPES[case["tshape"]](B, H, M, N), case["target_is"], gen,
                         normalized=case.get("normalized", True))
    key_mask = key_mask_of(case["mask"], B, H, M, N, gen)
    check_kl(backend, logits, target, target_is=case["target_is"], temperature=case["T"], key_mask=key_mask,
             gen=gen)


def test_n1_gives_zero(backend):
    """With one key both distributions are one-hot: KL = 0 and dlogits = 0."""
    gen = make_gen("n1", backend)
    logits = randn((2, 2, 3, 1), gen, requires_grad=True)
    kl, g = check_kl(backend, logits, make_target((2, 1, 3, 1), "logits", gen), target_is="logits", gen=gen)
    assert (kl == 0).all() and (g == 0).all()


# --------------------------------------------------------------------------------------------------
# Reductions x temperatures, with a scalar weight on the loss (grad_output != 1)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend, reduction, temperature):
    gen = make_gen("kl_red", backend, reduction, temperature)
    B, H, M, N = 2, 2, 6, 33
    logits = randn((B, H, M, N), gen, requires_grad=True, scale=2.0)
    target = make_target((B, 1, M, N), "probs", gen)
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    loss = attention_kl(logits, target, temperature=temperature, reduction=reduction, key_mask=key_mask,
                        backend=backend)
    (lg64,) = detached64(logits)
    rows = ref_kl_rows(lg64, target, "probs", temperature, key_mask)
    want = ref_reduce(rows, reduction, B)
    assert loss.shape == want.shape and loss.dtype == torch.float32
    assert_close(loss, want, torch.float32, grad=True, name=f"kl {reduction}")
    # reductions documented explicitly: mean = sum / (B*H*M) rows, batchmean = sum / B
    if reduction == "mean":
        torch.testing.assert_close(loss.double(), rows.sum().detach() / (B * H * M), atol=1e-5, rtol=1e-5)
    if reduction == "batchmean":
        torch.testing.assert_close(loss.double(), rows.sum().detach() / B, atol=1e-5, rtol=1e-5)
    weight = 0.37 if reduction != "none" else randn(loss.shape, gen, loss.dtype, loss.device)
    (got,) = torch.autograd.grad((loss * weight).sum(), logits)
    w64 = weight if isinstance(weight, float) else weight.double()
    (exp,) = torch.autograd.grad((want * w64).sum(), lg64)
    assert_close(got, exp, torch.float32, grad=True, name="dlogits")
    # d/dlogits = weight * (softmax(s) - t) / T, explicitly (rows of the kept keys)
    if reduction == "sum":
        p = torch.exp(ref_student_log_probs(lg64.detach() / temperature, key_mask))
        p = torch.where(key_mask.expand(p.shape), p, torch.zeros_like(p))
        t = ref_target_probs(target, p.shape, "probs", temperature, key_mask)
        assert_close(got, weight * (p - t) / temperature, torch.float32, grad=True, name="dlogits formula")


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_matches_f_kl_div_without_mask(backend):
    """Without a mask and with normalised targets: 'sum' and 'batchmean' equal F.kl_div's; 'mean' is
    per row, i.e. F.kl_div(reduction='mean') * N (F.kl_div's mean is over all elements)."""
    gen = make_gen("f_kl_div", backend)
    B, H, M, N = 2, 2, 5, 29
    logits = randn((B, H, M, N), gen, scale=2.0)
    target = make_target((B, H, M, N), "probs", gen)
    logp = F.log_softmax(logits.double() / 1.5, -1)
    t = target.double()
    for reduction in ("sum", "batchmean"):
        got = attention_kl(logits, target, temperature=1.5, reduction=reduction, backend=backend)
        assert_close(got, F.kl_div(logp, t, reduction=reduction), torch.float32, grad=True, name=reduction)
    got = attention_kl(logits, target, temperature=1.5, reduction="mean", backend=backend)
    assert_close(got, F.kl_div(logp, t, reduction="mean") * N, torch.float32, grad=True, name="mean")
    got = attention_kl(logits, torch.log_softmax(target.double().log(), -1).float(), target_is="log_probs",
                       temperature=1.5, reduction="sum", backend=backend)
    assert_close(got, F.kl_div(logp, t.log(), reduction="sum", log_target=True), torch.float32, grad=True,
                 name="log_probs sum")


def test_default_reduction_is_batchmean(backend):
    gen = make_gen("default_red", backend)
    logits = randn((3, 2, 4, 19), gen)
    target = make_target((3, 2, 4, 19), "probs", gen)
    a = attention_kl(logits, target, backend=backend)
    b = attention_kl(logits, target, reduction="batchmean", backend=backend)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert_close(a, ref_kl_rows(logits.double(), target).sum() / 3, torch.float32, grad=True, name="batchmean")


# --------------------------------------------------------------------------------------------------
# dtypes (fp32 accumulation from fp16/bf16 inputs; fp64 on the torch backend)
# --------------------------------------------------------------------------------------------------

def _dtype_params():
    out = []
    for backend in BACKENDS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            if backend_supports(backend, dtype):
                for target_is in TARGET_KINDS:
                    out.append(pytest.param(backend, dtype, target_is,
                                            id=f"{backend}-{DTYPE_IDS[dtype]}-{target_is}"))
    return out


@pytest.mark.parametrize("backend,dtype,target_is", _dtype_params())
def test_dtypes(backend, dtype, target_is):
    gen = make_gen("kl_dtypes", backend, DTYPE_IDS[dtype], target_is)
    B, H, M, N = 2, 2, 7, 45
    logits = randn((B, H, M, N), gen, dtype, requires_grad=True, scale=3.0)
    target = make_target((B, 1, M, N), target_is, gen, dtype=dtype)  # target in the same low precision
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    kl, g = check_kl(backend, logits, target, target_is=target_is, temperature=1.5, key_mask=key_mask, gen=gen)
    assert g.dtype == dtype


@pytest.mark.parametrize("dtype,target_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float16), (torch.float32, torch.float64)],
                         ids=["fp16-fp32target", "bf16-fp32target", "fp32-fp16target", "fp32-fp64target"])
def test_mixed_target_dtype(backend, dtype, target_dtype):
    """A teacher in another float dtype than the student logits (mixed dtypes are allowed)."""
    gen = make_gen("kl_mixed", backend, DTYPE_IDS[dtype], DTYPE_IDS[target_dtype])
    logits = randn((1, 2, 9, 40), gen, dtype, requires_grad=True, scale=2.0)
    target = make_target((1, 2, 9, 40), "logits", gen, dtype=target_dtype)
    check_kl(backend, logits, target, target_is="logits", temperature=0.5, gen=gen)


def test_fp32_accumulation_low_precision(backend):
    """Long fp16 rows whose terms are tiny: an fp16 accumulator would lose them; fp32 keeps them."""
    gen = make_gen("kl_acc", backend)
    N = 70
    logits = randn((1, 2, 3, N), gen, torch.float16, requires_grad=True, scale=0.01)
    target = make_target((1, 2, 3, N), "logits", gen, dtype=torch.float16) * 0.01
    kl, _ = check_kl(backend, logits, target, target_is="logits", gen=gen, dtype=torch.float32)
    assert (kl > 0).all()


# --------------------------------------------------------------------------------------------------
# Numerics: huge logits, zeros in the target, fully masked rows, zero-mass rows
# --------------------------------------------------------------------------------------------------

LARGE_CASES = [
    # student logits: a per-row offset ~1e4 plus O(1) differences (several keys share the mass)
    dict(id="student_offset1e4_probs", student="offset", teacher="probs", T=2.0),
    # student logits ~1e4 everywhere (one-hot softmax): a KL of order 1e4
    dict(id="student_1e4_onehot_probs", student="big", teacher="probs", T=1.0),
    dict(id="student_1e4_onehot_logits", student="big", teacher="logits_small", T=2.0),
    # teacher log-probabilities down to ~-1e4 (temperature is not applied to them)
    dict(id="teacher_log_probs_1e4", student="small", teacher="log_probs_big", T=2.0),
    # teacher logits with a per-row offset ~1e4 (softened by T like the student)
    dict(id="teacher_logits_offset1e4", student="small", teacher="logits_offset", T=2.0),
    # both ~1e4 and close: KL of order 0.1 although every logit is ~1e4
    dict(id="both_offset1e4_close", student="offset", teacher="logits_close", T=1.0),
]


def _large_params():
    out = []
    for backend in BACKENDS:
        for c in LARGE_CASES:
            out.append(pytest.param(backend, c, id=f"{backend}-{c['id']}"))
    return out


@pytest.mark.parametrize("backend,case", _large_params())
def test_large_logits_stable(backend, case):
    """|logits| ~ 1e4 (student and/or teacher): no overflow, no catastrophic cancellation.

    The loss must be accurate to fp32 level relative to its own size (1e-5). The gradient
    (softmax(s) - t) / T is recomputed from the saved row statistics, which are kept as (row max,
    log l) pairs: folded into one fp32 logsumexp of size ~1e4 they would cost ~1e-3 relative error,
    kept apart the gradient is accurate to fp32 level (1e-5 of its scale)."""
    gen = make_gen("kl_large", backend, case["id"])
    B, H, M, N = 1, 2, 5, 33
    offset = randn((B, H, M, 1), gen, torch.float64, scale=1e4)
    student = {
        "offset": lambda: offset + randn((B, H, M, N), gen, torch.float64, scale=2.0),
        "big": lambda: randn((B, H, M, N), gen, torch.float64, scale=1e4),
        "small": lambda: randn((B, H, M, N), gen, torch.float64, scale=2.0),
    }[case["student"]]()
    logits = student.float().requires_grad_(True)
    target_is, target = {
        "probs": lambda: ("probs", make_target((B, 1, M, N), "probs", gen)),
        "logits_small": lambda: ("logits", make_target((B, 1, M, N), "logits", gen)),
        "log_probs_big": lambda: ("log_probs", torch.log_softmax(randn((B, 1, M, N), gen, torch.float64, scale=1e4),
                                                                 -1).float()),
        "logits_offset": lambda: ("logits", (offset + randn((B, H, M, N), gen, torch.float64, scale=2.0)).float()),
        "logits_close": lambda: ("logits", (logits.detach().double()
                                            + randn((B, H, M, N), gen, torch.float64, scale=0.5)).float()),
    }[case["teacher"]]()
    T = case["T"]
    kl = attention_kl(logits, target, target_is=target_is, temperature=T, reduction="none", backend=backend)
    (lg64,) = detached64(logits)
    want = ref_kl_rows(lg64, target, target_is, T)
    assert torch.isfinite(kl).all()
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(kl.double(), want.detach(), atol=1e-5 * scale, rtol=1e-5)
    r = randn(kl.shape, gen)
    (got,) = torch.autograd.grad(kl, logits, r)
    (exp,) = torch.autograd.grad(want, lg64, r.double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), exp, atol=1e-5 * max(1.0, r.abs().max().item()) / T, rtol=1e-4)


HUGE_ROWS = [
    # (which distribution gets the huge row, its value): a whole row at -1e30 or finfo.min (float
    # masks written into logits, HF style) must stay a uniform distribution, not collapse to p = 1
    pytest.param("student", -1e30, id="student_-1e30"),
    pytest.param("student", torch.finfo(torch.float32).min, id="student_finfo_min"),
    pytest.param("student", 3e8, id="student_+3e8"),
    pytest.param("target", -1e30, id="target_-1e30"),
    pytest.param("target", torch.finfo(torch.float32).min, id="target_finfo_min"),
]


def check_huge_magnitude_rows(backend, where, value, device=DEVICE):
    """A row whose logits are all ~value (|value| >> log N, so value + log N rounds to value): the
    saved statistics keep (row max, log l) apart, so the backward's softmax is still 1/N-exact.
    With one fp32 logsumexp the gradient of such a row was off by (N - 1) / N."""
    gen = make_gen("kl_huge", backend, where, str(value))
    B, H, M, N = 1, 2, 3, 37
    logits = randn((B, H, M, N), gen, scale=2.0, device=device)
    target = randn((B, H, M, N), gen, scale=2.0, device=device)
    (logits if where == "student" else target)[0, 1, 1] = value
    (logits if where == "student" else target)[0, 0, 2, : N // 2] = value  # half a row, other half finite
    logits.requires_grad_(True)
    kl = attention_kl(logits, target, target_is="logits", reduction="none", backend=backend)
    lg64 = logits.detach().double().requires_grad_(True)
    want = (torch.softmax(target.double(), -1) * (torch.log_softmax(target.double(), -1)
                                                   - torch.log_softmax(lg64, -1))).sum(-1)
    if where == "student" and value < 0:
        want = want.detach()  # half-row rows: KL ~ |value|, compared through finiteness only
        finite = want.abs() < 1e6
        torch.testing.assert_close(kl.double()[finite], want[finite], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(kl.double(), want.detach(), atol=1e-5, rtol=1e-5)
    r = randn(kl.shape, gen, device=device)
    (got,) = torch.autograd.grad(kl, logits, r)
    exp = r.double()[..., None] * (torch.softmax(lg64.detach(), -1) - torch.softmax(target.double(), -1))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), exp, atol=1e-5 * r.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("where,value", HUGE_ROWS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_magnitude_rows(backend, where, value):
    check_huge_magnitude_rows(backend, where, value)


@pytest.mark.parametrize("target_is", TARGET_KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_and_zero_mass(backend, target_is):
    """Rows with no kept key give KL 0 and zero gradient; so do probability rows whose mass is zero
    (everywhere, or only on the kept keys). t = 0 terms contribute nothing."""
    gen = make_gen("kl_masked", backend, target_is)
    B, H, M, N = 2, 2, 6, 35
    logits = randn((B, H, M, N), gen, requires_grad=True, scale=2.0)
    target = make_target((B, 1, M, N), target_is, gen)
    key_mask = torch.rand(B, 1, M, N, generator=gen) < 0.6
    key_mask[:, :, :, 1] = True
    key_mask[0, 0, 2] = False  # a fully masked row (both heads)
    key_mask[1, 0, 5] = False
    key_mask = key_mask.to(DEVICE)
    if target_is == "probs":
        target[0, 0, 4] = 0.0                       # no target mass at all
        target[1, 0, 3] = torch.where(key_mask[1, 0, 3], 0.0, target[1, 0, 3])  # mass only on dropped keys
        target[1, 0, 1, ::2] = 0.0                  # zeros inside a row
    else:
        target[1, 0, 1, ::2] = NEG_INF              # log 0 / logit -inf: zero probability keys
    kl, g = check_kl(backend, logits, target, target_is=target_is, key_mask=key_mask, gen=gen)
    assert (kl[0, :, 2] == 0).all() and (kl[1, :, 5] == 0).all()
    assert (g[0, :, 2] == 0).all() and (g[1, :, 5] == 0).all()
    assert torch.where(key_mask.expand(g.shape), torch.zeros_like(g), g).abs().max() == 0, \
        "dropped keys must get zero gradient"
    if target_is == "probs":
        assert (kl[0, :, 4] == 0).all() and (g[0, :, 4] == 0).all()
        assert (kl[1, :, 3] == 0).all() and (g[1, :, 3] == 0).all()


def test_all_rows_masked(backend):
    gen = make_gen("kl_all_masked", backend)
    logits = randn((1, 2, 4, 20), gen, requires_grad=True)
    key_mask = torch.zeros(1, 1, 1, 20, dtype=torch.bool, device=DEVICE)
    for reduction in REDUCTIONS:
        loss = attention_kl(logits, make_target((1, 1, 4, 20), "probs", gen), reduction=reduction,
                            key_mask=key_mask, backend=backend)
        assert (loss == 0).all()
        (g,) = torch.autograd.grad(loss.sum(), logits)
        assert (g == 0).all()


def test_student_minus_inf_where_target_is_zero(backend):
    """Student logits of -inf (a hand-masked key) where the teacher gives probability 0: the key
    contributes 0 (t log t = 0 and t * s = 0), the KL is that of the remaining keys."""
    gen = make_gen("kl_student_inf", backend)
    B, H, M, N = 1, 2, 4, 33
    logits = randn((B, H, M, N), gen, scale=2.0)
    target = make_target((B, 1, M, N), "probs", gen)
    target[..., 5:9] = 0.0
    logits[..., 5:9] = NEG_INF
    kl = attention_kl(logits, target, reduction="none", backend=backend)
    keep = torch.ones(N, dtype=torch.bool)
    keep[5:9] = False
    want = ref_kl_rows(logits.double().masked_fill(~keep.to(DEVICE), 0.0), target, key_mask=keep.to(DEVICE))
    assert_close(kl, want, torch.float32, grad=True, name="kl rows")


# --------------------------------------------------------------------------------------------------
# Gradients: gradcheck (float64, torch), non-contiguous / broadcast upstream gradients, no target grad
# --------------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    dict(id="probs_T1", target_is="probs", T=1.0, mask=False, reduction="none"),
    dict(id="probs_T05_mask_sum", target_is="probs", T=0.5, mask=True, reduction="sum"),
    dict(id="logits_T2_mask_batchmean", target_is="logits", T=2.0, mask=True, reduction="batchmean"),
    dict(id="log_probs_T2_mean", target_is="log_probs", T=2.0, mask=False, reduction="mean"),
]


@pytest.mark.parametrize("case", _params(GRADCHECK_CASES))
def test_gradcheck_torch_fp64(case):
    gen = make_gen("kl_gradcheck", case["id"])
    B, H, M, N = 2, 2, 3, 7
    logits = randn((B, H, M, N), gen, torch.float64, requires_grad=True)
    target = make_target((B, 1, M, N), case["target_is"], gen, dtype=torch.float64)
    key_mask = None
    if case["mask"]:
        key_mask = torch.rand(B, 1, M, N, generator=gen) < 0.6
        key_mask[..., 0] = True
        key_mask[0, 0, 1] = False
        key_mask = key_mask.to(DEVICE)

    def fn(lg):
        return attention_kl(lg, target, target_is=case["target_is"], temperature=case["T"],
                            reduction=case["reduction"], key_mask=key_mask, backend="torch")

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_upstream_gradient(backend, layout):
    """grad_output for reduction='none' with unusual strides (transposed, or stride 0 from expand)."""
    gen = make_gen("kl_grad_layout", backend, layout)
    B, H, M, N = 2, 2, 5, 30
    logits = randn((B, H, M, N), gen, requires_grad=True)
    target = make_target((B, 1, M, N), "probs", gen)
    kl = attention_kl(logits, target, reduction="none", backend=backend)
    if layout == "transposed":
        r = randn((B, M, H), gen).transpose(1, 2)
    else:
        r = randn((B, 1, M), gen).expand(B, H, M)
    assert not r.is_contiguous()
    (got,) = torch.autograd.grad(kl, logits, r)
    (lg64,) = detached64(logits)
    (exp,) = torch.autograd.grad(ref_kl_rows(lg64, target), lg64, r.double())
    assert_close(got, exp, torch.float32, grad=True, name="dlogits")


def test_no_gradient_to_target(backend):
    gen = make_gen("kl_no_target_grad", backend)
    logits = randn((1, 2, 4, 20), gen, requires_grad=True)
    for target_is in TARGET_KINDS:
        target = make_target((1, 2, 4, 20), target_is, gen).requires_grad_(True)
        loss = attention_kl(logits, target, target_is=target_is, backend=backend)
        g_logits, g_target = torch.autograd.grad(loss, (logits, target), allow_unused=True)
        assert g_logits is not None and g_logits.abs().sum() > 0
        assert g_target is None or (g_target == 0).all(), f"{target_is}: the target must not receive a gradient"


def test_no_grad_mode_and_detached(backend):
    gen = make_gen("kl_no_grad", backend)
    logits = randn((2, 2, 4, 25), gen)
    target = make_target((2, 1, 4, 25), "probs", gen)
    with torch.no_grad():
        a = attention_kl(logits, target, reduction="none", backend=backend)
    b = attention_kl(logits, target, reduction="none", backend=backend)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# Layouts: 2-D / 3-D logits, non-contiguous logits, broadcast (stride-0) targets and masks
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_dims(backend, ndim):
    """(M, N) and (H, M, N) logits: rows over the last dim; 'none' keeps the leading dims and
    'batchmean' divides by the first dim (as F.kl_div)."""
    gen = make_gen("kl_ndim", backend, ndim)
    shape = (6, 27) if ndim == 2 else (3, 5, 27)
    logits = randn(shape, gen, requires_grad=True)
    target = make_target(shape, "logits", gen)
    kl, _ = check_kl(backend, logits, target, target_is="logits", temperature=2.0, gen=gen)
    assert kl.shape == shape[:-1]
    bm = attention_kl(logits, target, target_is="logits", temperature=2.0, backend=backend)
    assert_close(bm, kl.detach().double().sum() / shape[0], torch.float32, grad=True, name="batchmean")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_target_mask"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, layout):
    gen = make_gen("kl_noncontig", backend, layout)
    B, H, M, N = 2, 2, 7, 33
    key_mask = None
    if layout == "transposed":
        base = randn((B, N, H, M), gen, requires_grad=True)
        logits = base.permute(0, 2, 3, 1)
        target = make_target((B, H, N, M), "logits", gen).transpose(-1, -2)
        target_is = "logits"
    elif layout == "sliced":
        base = randn((B, 2 * H, M, N + 9), gen, requires_grad=True)
        logits = base[:, ::2, :, 4:4 + N]
        target = make_target((B, 1, M, N + 3), "probs", gen)[..., :N]
        target_is = "probs"
    else:
        base = randn((B, H, M, N), gen, requires_grad=True)
        logits = base
        target = make_target((1, 1, M, N), "probs", gen).expand(B, H, M, N)
        key_mask = (torch.rand(N, generator=gen) < 0.7).to(DEVICE).expand(B, H, M, N)
        target_is = "probs"
    kl = attention_kl(logits, target, target_is=target_is, key_mask=key_mask, reduction="none", backend=backend)
    (lg64,) = detached64(logits)
    want = ref_kl_rows(lg64, target, target_is, 1.0, key_mask)
    assert_close(kl, want, torch.float32, grad=True, name="kl rows")
    r = randn(kl.shape, gen)
    (got,) = torch.autograd.grad(kl, base, r)
    (exp,) = torch.autograd.grad(want, lg64, r.double())
    exp_base = torch.zeros(base.shape, dtype=torch.float64, device=DEVICE)
    if layout == "transposed":
        exp_base = exp.permute(0, 3, 1, 2)
    elif layout == "sliced":
        exp_base[:, ::2, :, 4:4 + N] = exp
    else:
        exp_base = exp
    assert_close(got, exp_base, torch.float32, grad=True, name="grad")


def test_backends_agree():
    if len(BACKENDS) < 2:
        pytest.skip("only the torch backend is usable here")
    gen = make_gen("kl_agree")
    logits = randn((2, 2, 9, 41), gen, scale=2.0)
    target = make_target((2, 1, 9, 41), "logits", gen)
    key_mask = key_mask_of("B11N", 2, 2, 9, 41, gen)
    res = [attention_kl(logits, target, target_is="logits", temperature=0.5, reduction="none", key_mask=key_mask,
                        backend=b) for b in BACKENDS]
    for b, r in zip(BACKENDS[1:], res[1:]):
        torch.testing.assert_close(r, res[0], atol=2e-5, rtol=2e-5, msg=lambda m: f"{b} vs torch: {m}")


def test_auto_backend(monkeypatch):
    gen = make_gen("kl_auto")
    logits = randn((1, 2, 4, 20), gen)
    target = make_target((1, 1, 4, 20), "probs", gen)
    want = ref_kl_rows(logits.double(), target)
    assert_close(attention_kl(logits, target, reduction="none"), want, torch.float32, grad=True, name="auto")
    for b in BACKENDS:
        monkeypatch.setenv("LFI_BACKEND", b)
        assert_close(attention_kl(logits, target, reduction="none"), want, torch.float32, grad=True, name=b)


@pytest.mark.parametrize("chunk_bytes", ["1", "3000"], ids=["1row", "few_rows"])
def test_torch_backend_row_chunks(monkeypatch, chunk_bytes):
    """The torch backend computes in row chunks (LFI_TORCH_CHUNK_BYTES): same values and gradients."""
    monkeypatch.setenv("LFI_TORCH_CHUNK_BYTES", chunk_bytes)
    gen = make_gen("kl_chunks", chunk_bytes)
    B, H, M, N = 2, 2, 11, 23
    logits = randn((B, H, M, N), gen, requires_grad=True)
    target = make_target((B, 1, 1, N), "probs", gen)
    key_mask = key_mask_of("11MN", B, H, M, N, gen)
    check_kl("torch", logits, target, key_mask=key_mask, temperature=2.0, gen=gen)


# --------------------------------------------------------------------------------------------------
# validate=True
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_validate(backend):
    gen = make_gen("kl_validate", backend)
    logits = randn((2, 2, 4, 30), gen)
    good = make_target((2, 1, 4, 30), "probs", gen)
    attention_kl(logits, good, validate=True, backend=backend)
    attention_kl(logits, good.half(), validate=True, backend=backend)
    attention_kl(logits, good.log(), target_is="log_probs", validate=True, backend=backend)
    attention_kl(logits, torch.randn(2, 1, 4, 30, generator=gen).to(DEVICE) * 5, target_is="logits",
                 validate=True, backend=backend)  # logits need no normalisation
    bad = good.clone()
    bad[1, 0, 2] *= 1.5
    with pytest.raises(ValueError, match="validate"):
        attention_kl(logits, bad, validate=True, backend=backend)
    with pytest.raises(ValueError, match="validate"):
        attention_kl(logits, bad.log(), target_is="log_probs", validate=True, backend=backend)
    # without validate, unnormalised probabilities are renormalised per row
    a = attention_kl(logits, bad, reduction="none", backend=backend)
    b = attention_kl(logits, bad / bad.sum(-1, keepdim=True), reduction="none", backend=backend)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------------
# The custom ops: opcheck (schema, fake kernel, autograd registration, AOT dispatch)
# --------------------------------------------------------------------------------------------------

OPCHECK_CASES = [
    dict(id="probs_nomask", target_is_logits=False, mask=False, tshape=(2, 1, 5, 20)),
    dict(id="logits_mask_111N", target_is_logits=True, mask=True, tshape=(1, 1, 1, 20)),
]


@pytest.mark.parametrize("case", _params(OPCHECK_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, case):
    gen = make_gen("kl_opcheck", backend, case["id"])
    B, H, M, N = 2, 2, 5, 20
    logits = randn((B, H, M, N), gen, requires_grad=True)
    target = make_target(case["tshape"], "logits" if case["target_is_logits"] else "probs", gen)
    key_mask = key_mask_of("B11N", B, H, M, N, gen) if case["mask"] else None
    args = (logits, target, key_mask, 1 / 1.5, 1 / 1.5 if case["target_is_logits"] else 1.0,
            case["target_is_logits"], backend)
    op = torch.ops.lfi.attention_kl_fwd.default
    torch.library.opcheck(op, args)
    kl, stats, tstats = op(*args)
    assert kl.shape == (B, H, M) and stats.shape == tstats.shape == (B, H, M, 2)
    assert kl.dtype == stats.dtype == tstats.dtype == torch.float32
    g = randn((B, H, M), gen)
    torch.library.opcheck(torch.ops.lfi.attention_kl_bwd.default,
                          (g, logits.detach(), target, key_mask, stats, tstats, *args[3:]))


def test_op_row_statistics(backend):
    """The forward op's row statistics: stats = (row max, log l) of the kept scaled scores, so that
    max + log l = logsumexp ((0, +inf) with no kept key); tstats = (0, log Z) for probabilities."""
    gen = make_gen("kl_op_lse", backend)
    B, H, M, N = 1, 2, 4, 21
    logits = randn((B, H, M, N), gen)
    key_mask = torch.rand(B, 1, M, N, generator=gen) < 0.6
    key_mask[..., 0] = True
    key_mask[0, 0, 3] = False
    target = make_target((B, 1, M, N), "probs", gen)
    kl, stats, tstats = torch.ops.lfi.attention_kl_fwd.default(logits, target, key_mask, 0.5, 1.0, False, backend)
    s = (logits.double() * 0.5).masked_fill(~key_mask, NEG_INF)
    want = torch.logsumexp(s, -1)
    assert (stats[:, :, 3, 0] == 0).all() and (stats[:, :, 3, 1] == float("inf")).all()
    torch.testing.assert_close(stats[:, :, :3, 0].double(), s.amax(-1)[:, :, :3], atol=0, rtol=0)
    torch.testing.assert_close(stats[:, :, :3].double().sum(-1), want[:, :, :3], atol=1e-5, rtol=1e-5)
    mass = target.double().masked_fill(~key_mask, 0).sum(-1).expand(B, H, M)
    assert (tstats[..., 0] == 0).all()
    torch.testing.assert_close(tstats[:, :, :3, 1].double(), mass[:, :, :3].log(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument
# --------------------------------------------------------------------------------------------------

EB, EH, EM, EN = 2, 2, 3, 8


def _lg(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (EB, EH, EM, EN)), generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)


def _tg(*shape):
    return torch.softmax(_lg(*(shape or (EB, 1, EM, EN))), -1)


def _err(**over):
    def build():
        kw = dict(student_logits=_lg(), target=_tg())
        kw.update({k: (v() if callable(v) else v) for k, v in over.items()})
        return kw
    return build


ERROR_CASES = [
    ("logits_not_tensor", _err(student_logits=[[0.0, 1.0]]), TypeError, r"student_logits"),
    ("logits_int", _err(student_logits=lambda: _lg().long()), TypeError, r"student_logits"),
    ("logits_1d", _err(student_logits=lambda: _lg(EN)), ValueError, r"student_logits"),
    ("logits_5d", _err(student_logits=lambda: _lg(1, EB, EH, EM, EN)), ValueError, r"student_logits"),
    ("logits_empty", _err(student_logits=lambda: _lg(EB, EH, 0, EN), target=lambda: _tg(EN)), ValueError,
     r"student_logits"),
    ("target_not_tensor", _err(target=[[0.5, 0.5]]), TypeError, r"target"),
    ("target_int", _err(target=lambda: torch.ones(EB, 1, EM, EN, dtype=torch.long, device=DEVICE)), TypeError,
     r"target"),
    ("target_shape_N", _err(target=lambda: _tg(EB, 1, EM, EN + 1)), ValueError, r"target"),
    ("target_shape_H", _err(target=lambda: _tg(EB, 3, EM, EN)), ValueError, r"target"),
    ("target_shape_5d", _err(target=lambda: _tg(1, EB, 1, EM, EN)), ValueError, r"target"),
    ("target_device", _err(target=lambda: torch.empty(EB, 1, EM, EN, device="meta")), ValueError, r"target"),
    ("target_negative_probs", _err(target=lambda: _tg() - 0.5), ValueError, r"(?i)negative"),
    ("target_is_unknown", _err(target_is="prob"), ValueError, r"target_is"),
    ("reduction_unknown", _err(reduction="average"), ValueError, r"reduction"),
    ("reduction_none_object", _err(reduction=None), ValueError, r"reduction"),
    ("temperature_zero", _err(temperature=0.0), ValueError, r"temperature"),
    ("temperature_negative", _err(temperature=-1.0), ValueError, r"temperature"),
    ("temperature_nan", _err(temperature=float("nan")), ValueError, r"temperature"),
    ("temperature_str", _err(temperature="1"), ValueError, r"temperature"),
    ("temperature_bool", _err(temperature=True), ValueError, r"temperature"),
    ("key_mask_float", _err(key_mask=lambda: torch.ones(EN, device=DEVICE)), TypeError, r"key_mask"),
    ("key_mask_shape", _err(key_mask=lambda: torch.ones(EN + 1, dtype=torch.bool, device=DEVICE)), ValueError,
     r"key_mask"),
    ("key_mask_device", _err(key_mask=lambda: torch.ones(EN, dtype=torch.bool, device="meta")), ValueError,
     r"key_mask"),
    ("backend_unknown", _err(backend="numpy"), ValueError, r"backend"),
    ("validate_not_normalised", _err(target=lambda: _tg() * 2, validate=True), ValueError, r"validate"),
]


@pytest.mark.parametrize("build,exc,pattern", [pytest.param(b, e, p, id=i) for i, b, e, p in ERROR_CASES])
def test_errors(build, exc, pattern):
    kw = build()
    with pytest.raises(exc, match=pattern):
        attention_kl(kw.pop("student_logits"), kw.pop("target"), **kw)


def test_negative_values_allowed_for_logit_targets():
    logits, target = _lg(), _lg(EB, 1, EM, EN) - 3.0
    attention_kl(logits, target, target_is="logits", backend="torch")
    attention_kl(logits, torch.log_softmax(target, -1), target_is="log_probs", backend="torch")


# --------------------------------------------------------------------------------------------------
# Property test (torch backend): random shapes, kinds, reductions, masks
# --------------------------------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


if given is not None:
    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(B=st.integers(1, 2), H=st.integers(1, 3), M=st.integers(1, 6), N=st.integers(1, 40),
           target_heads=st.sampled_from(["1", "H"]), target_is=st.sampled_from(TARGET_KINDS),
           temperature=st.sampled_from([0.5, 1.0, 2.0, 3.7]), reduction=st.sampled_from(REDUCTIONS),
           masked=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def test_property_torch(B, H, M, N, target_heads, target_is, temperature, reduction, masked, seed):
        gen = torch.Generator().manual_seed(seed)
        logits = randn((B, H, M, N), gen, torch.float64, requires_grad=True, scale=3.0)
        target = make_target((B, 1 if target_heads == "1" else H, M, N), target_is, gen, dtype=torch.float64)
        key_mask = (torch.rand(B, 1, M, N, generator=gen) < 0.7).to(DEVICE) if masked else None
        loss = attention_kl(logits, target, target_is=target_is, temperature=temperature, reduction=reduction,
                            key_mask=key_mask, backend="torch")
        want = ref_reduce(ref_kl_rows(logits, target, target_is, temperature, key_mask), reduction, B)
        assert loss.dtype == torch.float64
        assert_close(loss, want, torch.float64, grad=True, name="kl")
        assert (loss >= -1e-12).all(), "KL is non-negative"
        (g,) = torch.autograd.grad(loss.sum(), logits)
        (e,) = torch.autograd.grad(want.sum(), logits)
        assert_close(g, e, torch.float64, grad=True, name="dlogits")
        assert math.isfinite(loss.detach().sum().item())
