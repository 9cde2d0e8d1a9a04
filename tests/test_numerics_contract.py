"""The numerics contract of README "Numerics", on every backend of the matrix (torch, triton, cuda).

NaN / inf in q, k, v, a float mask or a KL target; rows with no attended key; KL with target mass on
keys the student gives -inf. Every case is compared, element by element, against eager float64
PyTorch computed from the same (rounded) inputs: ``softmax(scale * q k^T + mask) @ v`` (a bool mask
or causal masking by ``masked_fill(-inf)``, a float mask added) for attention, ``F.kl_div`` on the
normalised target for the KL ops. "Same" means: NaN at the same positions, the same infinities, and
the finite values within the usual tolerance (helpers.FWD_TOL / GRAD_TOL). The eager references are
written out here (not tests/reference.py, whose KL reference zeroes NaN rows by design).

Two rules are the contract's own, not eager's: a row with no attended key gives zeros (eager: NaN),
and t = 0 terms of the KL contribute 0 also where the student gives -inf (F.kl_div: 0 * inf = NaN).
Gradients: the finite (batch, head) slices match eager autograd; the rows made NaN by the forward
get NaN gradients (to q of that row; to k and v of that kv head, as in eager autograd); the KL ops'
NaN rows are NaN at every kept key and 0 at dropped keys, and +inf rows get the finite g (p - t).
Shapes stay small (the Triton CPU interpreter costs milliseconds per tile) but cover a main-loop
and a ragged key block (N = 37 with 32-key tiles), two row blocks (M = 20 with 16-row tiles),
grouped-query heads (H = 4, Hkv = 2), the online pass (no maps), the two-pass maps path and a
window of map rows.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ALL_BACKENDS,
    DEVICE,
    DTYPE_IDS,
    FWD_TOL,
    GRAD_TOL,
    INTERPRETER_NOISE,
    backend_param,
    backend_supports,
    make_gen,
    randn,
)

from lfi.ops import attention_kl, attention_kl_qk, interaction_attention

# The Triton CPU interpreter evaluates with numpy, which warns on the non-finite values these cases are about.
pytestmark = [pytest.mark.filterwarnings(INTERPRETER_NOISE),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

NAN, INF = float("nan"), float("inf")
B, H, HKV, M, N, D = 2, 4, 2, 20, 37, 16


# --------------------------------------------------------------------------------------------------
# Comparison: same NaN positions, same infinities, finite values within tolerance
# --------------------------------------------------------------------------------------------------

def assert_same(actual, expected, dtype, *, grad=False, name="tensor"):
    """`actual` (any dtype) against a float64 `expected`: NaN where and only where expected is NaN,
    +inf / -inf where and only where it is, the finite values within FWD_TOL (GRAD_TOL with atol
    scaled by the largest finite |expected| when grad)."""
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    for what, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        bad = fn(a) != fn(e)
        if bad.any():
            first = tuple(bad.nonzero()[0].tolist())
            raise AssertionError(f"{name}: {what} at {int(bad.sum())} positions differs from eager; first at "
                                 f"{first}: got {a[first].item()}, expected {e[first].item()}")
    finite = torch.isfinite(e)
    atol, rtol = (GRAD_TOL if grad else FWD_TOL)[dtype]
    if grad and finite.any():
        atol *= max(1.0, e[finite].abs().max().item())
    torch.testing.assert_close(a[finite], e[finite], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# Eager float64 references
# --------------------------------------------------------------------------------------------------

def eager_attention(q, k, v, mask=None, is_causal=False, scale=None):
    """float64 eager attention (differentiable): out (B, H, M, Dv), P (B, H, M, N). Bool mask and
    causal by masked_fill(-inf), float mask added; with a mask, rows with no attended key (every
    score -inf) are zeros in out and P (the contract; eager gives NaN there)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, -INF) if mask.dtype == torch.bool else s + mask.double()
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -INF)
    # Only a mask can empty a row (top-left causal rows attend key 0); without one an all -inf row
    # comes from infinite q / k and is NaN, as eager.
    dead = (s == -INF).all(-1, keepdim=True) & (mask is not None)
    p = torch.softmax(s, -1).masked_fill(dead, 0.0)
    return (p @ v).masked_fill(dead, 0.0), p


def eager_kl_rows(logits, target, target_is="probs", temperature=1.0, key_mask=None):
    """Per-row KL(t || softmax(logits / T)) over the kept keys, float64, via F.kl_div (differentiable
    w.r.t. logits). t: probabilities renormalised over the kept keys (target / sum: NaN where the row
    holds NaN or +inf), or softmax of the logits / log-probabilities. Contract rules on top of
    F.kl_div: t = 0 terms give 0 (also against a student -inf), rows without a kept key or without
    target mass give 0, a row whose kept keys hold target mass but whose student logits are all -inf
    gives +inf (F.kl_div: NaN from log_softmax of an all -inf row)."""
    s = logits.double() / temperature
    keep = torch.ones_like(s, dtype=torch.bool) if key_mask is None else key_mask.to(s.device).expand(s.shape)
    t = target.double().expand(s.shape)
    if target_is == "probs":
        t = torch.where(keep, t, 0.0)
        mass = t.sum(-1, keepdim=True)
        t = t / torch.where(mass == 0, 1.0, mass)
    else:
        u = t / temperature if target_is == "logits" else t
        u = u.masked_fill(~keep, -INF)
        t = torch.softmax(u, -1).nan_to_num(nan=NAN)
        t = torch.where((u == -INF).all(-1, keepdim=True), 0.0, t)  # no kept key (softmax: NaN)
    s_kept = s.masked_fill(~keep, -INF)
    student_dead = (s_kept == -INF).all(-1, keepdim=True)
    logp = F.log_softmax(torch.where(student_dead, 0.0, s_kept), -1)  # finite stand-in, fixed below
    terms = torch.where(t == 0, 0.0, F.kl_div(logp, t, reduction="none"))
    kl = terms.sum(-1)
    has_mass = (t != 0).any(-1)
    return torch.where(student_dead.squeeze(-1) & has_mass & ~kl.isnan(), INF, kl)


# --------------------------------------------------------------------------------------------------
# Attention: forward (out and maps)
# --------------------------------------------------------------------------------------------------

def _key_mask_false(idx):
    m = torch.ones(B, 1, 1, N, dtype=torch.bool)
    m[..., idx] = False
    return m


def _case_dead_rows_with_nans(q, k, v):
    """(0, *, 3) has no attended key (bool mask); NaN in v (kv head 0) and k (kv head 1) elsewhere."""
    m = torch.ones(B, 1, M, N, dtype=torch.bool)
    m[0, :, 3] = False
    v[0, 0, 8, 2] = NAN
    k[0, 1, 15, 0] = NAN
    return m, {}


def _case_dead_float_row_q_nan(q, k, v):
    """A float-mask row of -inf whose q is NaN: NaN + -inf = NaN, so the row is NaN, not empty."""
    m = randn((B, 1, M, N), make_gen("fmask_dead"))
    m[1, :, 6] = -INF
    m[0, :, 2] = -INF
    q[1, 2, 6, 0] = NAN  # NaN row
    return m, {}  # (0, *, 2) stays an empty row: zeros


def _case_dead_bool_row_q_nan(q, k, v):
    """A bool-masked row (no attended key) whose q is NaN: masked scores are never read, zeros."""
    m = torch.ones(B, 1, M, N, dtype=torch.bool)
    m[1, :, 6] = False
    q[1, 2, 6, 0] = NAN
    return m, {}


def _all_scores_neg_inf(mask=None, **kw):
    """Row (0, 2, 4) scores -inf at every key through q = +inf against k < 0 (kv head 1): without a
    mask the row is NaN (as eager); with a mask it counts as a row with no attended key (zeros)."""
    def setup(q, k, v):
        k[0, 1, :, 0] = -k[0, 1, :, 0].abs() - 0.1
        q[0, 2, 4, 0] = INF
        return (mask() if callable(mask) else mask), dict(kw)
    return setup


def _float_mask_with(idx, value):
    def setup(q, k, v):
        m = randn((B, 1, M, N), make_gen("fmask", idx))
        m[idx] = value
        return m, {}
    return setup


def _set(tensor_name, idx, value, mask=None, **kw):
    def setup(q, k, v):
        {"q": q, "k": k, "v": v}[tensor_name][idx] = value
        return (mask() if callable(mask) else mask), dict(kw)
    return setup


def _neg_inf_key_float_mask_k_nan(q, k, v):
    m = randn((B, 1, M, N), make_gen("fmask_key"))
    m[..., 11] = -INF
    k[0, 1, 11, 3] = NAN  # NaN + -inf = NaN: every row of kv head 1 (q heads 2, 3) of batch 0 is NaN
    return m, {}


def _bool_2d_mask_k_nan(q, k, v):
    m = torch.rand(B, 1, M, N, generator=make_gen("bool2d")) < 0.8
    m[..., 0] = True
    m[..., 11] = False
    k[0, 1, 11, 3] = NAN  # never read: every row masks key 11
    k[1, 0, 12, 0] = NAN  # read by the rows that attend key 12
    return m, {}


ATTENTION_CASES = [
    dict(id="q_nan", setup=_set("q", (0, 1, 3, 5), NAN)),
    dict(id="q_-inf", setup=_set("q", (1, 2, 0, 2), -INF)),
    dict(id="k_nan", setup=_set("k", (0, 1, 20, 3), NAN)),
    dict(id="k_+inf", setup=_set("k", (1, 0, 4, 0), INF)),
    dict(id="v_nan", setup=_set("v", (0, 0, 9, 1), NAN)),
    dict(id="v_+inf", setup=_set("v", (1, 1, 30, 0), INF)),
    dict(id="float_mask_nan", setup=_float_mask_with((0, 0, 2, 11), NAN)),
    dict(id="float_mask_+inf", setup=_float_mask_with((1, 0, 4, 36), INF)),
    dict(id="float_mask_-inf_key_k_nan", setup=_neg_inf_key_float_mask_k_nan),
    dict(id="key_padding_masked_k_nan", setup=_set("k", (0, 1, 11, 3), NAN, mask=lambda: _key_mask_false(11))),
    dict(id="bool_mask_masked_k_nan", setup=_bool_2d_mask_k_nan),
    # top-left causal, M < N: key 5 is attended by rows 5.. only, key 30 by none (its block is skipped)
    dict(id="causal_k_nan", setup=_set("k", (0, 0, 5, 1), NAN, is_causal=True)),
    dict(id="causal_unattended_k_nan", setup=_set("k", (1, 1, 30, 1), NAN, is_causal=True)),
    dict(id="dead_rows_with_nans", setup=_case_dead_rows_with_nans),
    dict(id="all_scores_-inf_no_mask", setup=_all_scores_neg_inf()),
    dict(id="all_scores_-inf_causal", setup=_all_scores_neg_inf(is_causal=True)),
    dict(id="all_scores_-inf_masked", setup=_all_scores_neg_inf(mask=lambda: _key_mask_false(11))),
    dict(id="dead_float_row_q_nan", setup=_case_dead_float_row_q_nan),
    dict(id="dead_bool_row_q_nan", setup=_case_dead_bool_row_q_nan),
]

MODES = {
    "out": dict(need_weights=False),                           # the online pass
    "maps": dict(need_weights=True),                           # the two-pass maps path, every row
    "rows": dict(need_weights=True, weights_rows=(15, 19)),    # a window: one row block online, one with maps
}


def _attention_inputs(case, dtype, requires_grad=False):
    gen = make_gen("numerics_attention", case["id"])
    q = randn((B, H, M, D), gen)
    k = randn((B, HKV, N, D), gen)
    v = randn((B, HKV, N, D), gen)
    mask, kw = case["setup"](q, k, v)
    q, k, v = (t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (q, k, v))
    if mask is not None:
        mask = mask.to(DEVICE) if mask.dtype == torch.bool else mask.to(DEVICE, dtype)
    return q, k, v, mask, kw


def _attention_params(dtypes):
    out = []
    for backend in ALL_BACKENDS:
        for dtype in dtypes:
            if backend_supports(backend, dtype):
                out.append(backend_param(backend, dtype, id=f"{backend}-{DTYPE_IDS[dtype]}"))
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES])
@pytest.mark.parametrize("backend,dtype", _attention_params([torch.float32]))
def test_attention_nonfinite_inputs(backend, dtype, case, mode):
    """out and maps against eager float64: NaN / inf rows (and v's NaN / inf columns) exactly where
    eager has them, zeros on rows with no attended key, finite values within tolerance."""
    q, k, v, mask, kw = _attention_inputs(case, dtype)
    opts = MODES[mode]
    res = interaction_attention(q, k, v, mask, backend=backend, **kw, **opts)
    out, w = res if opts["need_weights"] else (res, None)
    ref_out, ref_p = eager_attention(q, k, v, mask, is_causal=kw.get("is_causal", False))
    assert_same(out, ref_out, dtype, name="out")
    if w is not None:
        r0, r1 = opts.get("weights_rows") or (0, M)
        assert_same(w, ref_p[:, :, r0:r1], dtype, name="weights")


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES
                                  if c["id"] in ("q_nan", "k_nan", "float_mask_nan", "dead_rows_with_nans",
                                                 "causal_k_nan")])
@pytest.mark.parametrize("backend,dtype", _attention_params([torch.float16, torch.bfloat16, torch.float64]))
def test_attention_nonfinite_inputs_dtypes(backend, dtype, case):
    """The same contract in the other dtypes (maps path and online path)."""
    q, k, v, mask, kw = _attention_inputs(case, dtype)
    ref_out, ref_p = eager_attention(q, k, v, mask, is_causal=kw.get("is_causal", False))
    out, w = interaction_attention(q, k, v, mask, need_weights=True, backend=backend, **kw)
    assert_same(out, ref_out, dtype, name="out (maps path)")
    assert_same(w, ref_p, dtype, name="weights")
    out = interaction_attention(q, k, v, mask, backend=backend, **kw)
    assert_same(out, ref_out, dtype, name="out (online path)")


# --------------------------------------------------------------------------------------------------
# Attention: gradients
# --------------------------------------------------------------------------------------------------

GRAD_CASES = ["q_nan", "k_nan", "v_nan", "float_mask_nan", "causal_k_nan", "dead_bool_row_q_nan",
              "all_scores_-inf_no_mask"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES if c["id"] in GRAD_CASES])
@pytest.mark.parametrize("backend,dtype", _attention_params([torch.float32]))
def test_attention_nonfinite_gradients(backend, dtype, case):
    """Gradients of a loss on out and maps: every (batch, head) slice whose forward is finite gets
    eager's gradients; a row whose maps are NaN gets a NaN dq row, and NaN reaches dk, dv of its
    kv head (as in eager autograd); rows with no attended key get a zero dq row."""
    q, k, v, mask, kw = _attention_inputs(case, dtype, requires_grad=True)
    out, w = interaction_attention(q, k, v, mask, need_weights=True, backend=backend, **kw)
    gen = make_gen("numerics_grad", case["id"])
    r_out, r_w = randn(out.shape, gen), randn(w.shape, gen)
    dq, dk, dv = torch.autograd.grad((out * r_out).sum() + (w * r_w).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_p = eager_attention(q64, k64, v64, mask, is_causal=kw.get("is_causal", False))
    # eager's gradients where the slice is finite (NaN slices are compared by pattern below)
    ok_q = torch.isfinite(ref_out).flatten(2).all(-1) & torch.isfinite(ref_p).flatten(2).all(-1)  # (B, H)
    ok_kv = ok_q.unflatten(1, (HKV, H // HKV)).all(-1)  # (B, Hkv)
    loss64 = (torch.where(ok_q[..., None, None], ref_out, 0.0) * r_out.double()).sum() \
        + (torch.where(ok_q[..., None, None], ref_p, 0.0) * r_w.double()).sum()
    edq, edk, edv = torch.autograd.grad(loss64, (q64, k64, v64))
    assert_same(dq[ok_q], edq[ok_q], dtype, grad=True, name="dq (finite slices)")
    assert_same(dk[ok_kv], edk[ok_kv], dtype, grad=True, name="dk (finite slices)")
    assert_same(dv[ok_kv], edv[ok_kv], dtype, grad=True, name="dv (finite slices)")
    nan_rows = ref_p.isnan().any(-1)  # (B, H, M)
    assert bool(dq.isnan()[nan_rows].all()), "rows that are NaN in the forward must get NaN in dq"
    for b, hk in (~ok_kv).nonzero().tolist():
        if nan_rows[b, hk * (H // HKV):(hk + 1) * (H // HKV)].any():
            assert dk[b, hk].isnan().any() and dv[b, hk].isnan().any(), "NaN rows must reach dk and dv"
    dead = (ref_p == 0).all(-1) & ~nan_rows
    assert bool((dq[dead] == 0).all()), "rows with no attended key get zero gradients"


# --------------------------------------------------------------------------------------------------
# attention_kl
# --------------------------------------------------------------------------------------------------

KB, KH, KM, KN = 2, 2, 6, 37


def _kl_case(id, target_is="probs", student=(), target=(), key_mask=False, T=1.0, finite=False):
    """finite: the non-finite values sit at dropped keys only, so every row stays finite."""
    return dict(id=id, target_is=target_is, student=list(student), target=list(target), key_mask=key_mask, T=T,
                finite=finite)


KL_CASES = [
    _kl_case("target_nan", target=[((0, 0, 1, 4), NAN)]),
    _kl_case("target_+inf", target=[((1, 0, 2, 36), INF)]),  # the normalised target is NaN there
    _kl_case("target_nan_dropped_key", target=[((0, 0, 1, 4), NAN), ((1, 0, 3, 5), NAN)], key_mask=True),
    _kl_case("target_logits_nan", "logits", target=[((0, 0, 1, 4), NAN)], T=2.0),
    _kl_case("target_logits_+inf", "logits", target=[((1, 0, 2, 36), INF)]),
    _kl_case("target_log_probs_nan", "log_probs", target=[((0, 0, 5, 0), NAN)]),
    _kl_case("student_nan", student=[((0, 1, 1, 4), NAN)]),
    _kl_case("student_+inf", student=[((1, 0, 0, 33), INF)], T=2.0),
    _kl_case("student_nan_logits_target", "logits", student=[((0, 1, 1, 4), NAN)]),
    _kl_case("student_nan_dropped_key", student=[((0, 1, 1, 5), NAN)], key_mask=True, finite=True),
    # target mass on a key the student gives -inf: +inf, as F.kl_div
    _kl_case("student_-inf_with_mass", student=[((0, 0, 2, 7), -INF)]),
    _kl_case("student_-inf_with_mass_logits", "logits", student=[((1, 1, 4, 35), -INF)]),
    _kl_case("student_row_all_-inf", student=[((0, 1, 3, slice(None)), -INF)]),
]


def _kl_inputs(case, dtype):
    gen = make_gen("numerics_kl", case["id"])
    logits = randn((KB, KH, KM, KN), gen, scale=2.0)
    if case["target_is"] == "probs":
        target = torch.rand(KB, 1, KM, KN, generator=gen) + 0.01
        target = target / target.sum(-1, keepdim=True)
    elif case["target_is"] == "logits":
        target = randn((KB, 1, KM, KN), gen, scale=2.0)
    else:
        target = torch.log_softmax(randn((KB, 1, KM, KN), gen, scale=2.0), -1)
    for idx, val in case["student"]:
        logits[idx] = val
    for idx, val in case["target"]:
        target[idx] = val
    key_mask = None
    if case["key_mask"]:
        key_mask = torch.rand(KB, 1, KM, KN, generator=gen) < 0.7
        key_mask[..., 4] = True
        key_mask[..., 5] = False  # key 5: dropped everywhere (its NaN must not be read)
        key_mask = key_mask.to(DEVICE)
    return logits.to(DEVICE, dtype).requires_grad_(True), target.to(DEVICE, dtype), key_mask


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in KL_CASES])
@pytest.mark.parametrize("backend,dtype", _attention_params([torch.float32]))
def test_attention_kl_nonfinite(backend, dtype, case):
    """Per-row KL and dlogits against F.kl_div in float64: NaN in the student or the target makes
    the row NaN (gradient NaN at every kept key, 0 at dropped keys); target mass on a key the student
    gives -inf makes it +inf (gradient g (p - t) / T, finite); dropped keys are never read."""
    logits, target, key_mask = _kl_inputs(case, dtype)
    kw = dict(target_is=case["target_is"], temperature=case["T"], key_mask=key_mask)
    kl = attention_kl(logits, target, reduction="none", backend=backend, **kw)
    lg64 = logits.detach().double().requires_grad_(True)
    want = eager_kl_rows(lg64, target, case["target_is"], case["T"], key_mask)
    assert_same(kl, want, dtype, grad=True, name="kl rows")
    assert bool(want.isfinite().all()) == case["finite"], "the case's rows are not as intended"
    r = randn(kl.shape, make_gen("numerics_kl_r", case["id"]))
    (got,) = torch.autograd.grad(kl, logits, r.to(DEVICE))
    finite = torch.isfinite(want)
    keep = torch.ones_like(got, dtype=torch.bool) if key_mask is None else key_mask.expand(got.shape)
    # finite rows: eager autograd; NaN rows: NaN at every kept key, 0 at dropped keys
    (exp,) = torch.autograd.grad(torch.where(finite, want, 0.0), lg64, r.double().to(DEVICE))
    assert_same(got[finite], exp[finite], dtype, grad=True, name="dlogits (finite rows)")
    nan_rows = want.isnan()
    assert bool(got[nan_rows].isnan().eq(keep[nan_rows]).all()), "NaN rows: NaN at every kept key, else 0"
    assert bool((got[nan_rows][~keep[nan_rows]] == 0).all())
    inf_rows = torch.isposinf(want)
    if inf_rows.any():  # +inf rows: d KL / d logits = g (p - t) / T, finite
        s = (lg64.detach() / case["T"]).masked_fill(~keep, -INF)
        dead = (s == -INF).all(-1, keepdim=True)
        p = torch.where(dead, 0.0, torch.softmax(torch.where(dead, 0.0, s), -1))
        p = p.masked_fill(~keep, 0.0)
        t = _target_probs(target, case["target_is"], case["T"], keep)
        g_exp = r.double()[..., None] * (p - t) / case["T"]
        assert_same(got[inf_rows], g_exp[inf_rows], dtype, grad=True, name="dlogits (+inf rows)")


def _target_probs(target, target_is, T, keep):
    t = target.double().expand(keep.shape)
    if target_is == "probs":
        t = torch.where(keep, t, 0.0)
        return t / t.sum(-1, keepdim=True)
    u = (t / T if target_is == "logits" else t).masked_fill(~keep, -INF)
    return torch.softmax(u, -1)


# --------------------------------------------------------------------------------------------------
# attention_kl_qk and the fused KL of interaction_attention
# --------------------------------------------------------------------------------------------------

QK_CASES = [
    dict(id="q_nan", where="q", idx=(0, 1, 2, 3), value=NAN),
    dict(id="k_nan", where="k", idx=(1, 0, 30, 0), value=NAN),
    dict(id="target_nan", where="target", idx=(0, 0, 4, 9), value=NAN),
    dict(id="target_+inf", where="target", idx=(1, 0, 1, 2), value=INF),
    dict(id="teacher_q_nan", where="q_t", idx=(0, 0, 3, 1), value=NAN),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in QK_CASES])
@pytest.mark.parametrize("backend,dtype", _attention_params([torch.float32]))
def test_attention_kl_qk_nonfinite(backend, dtype, case):
    """attention_kl_qk against F.kl_div on the materialised logits: NaN in q, k, a dense target or
    an implicit teacher's q_t makes the affected rows NaN (dq NaN there); the other rows match."""
    gen = make_gen("numerics_kl_qk", case["id"])
    q, k = randn((KB, KH, KM, D), gen), randn((KB, 1, KN, D), gen)
    implicit = case["where"] == "q_t"
    if implicit:
        target = (randn((KB, 1, KM, 8), gen), randn((KB, 1, KN, 8), gen))
        target[0][case["idx"]] = case["value"]
    else:
        target = torch.softmax(randn((KB, 1, KM, KN), gen), -1)
        {"q": q, "k": k, "target": target}[case["where"]][case["idx"]] = case["value"]
    q, k = (t.to(DEVICE, dtype).requires_grad_(True) for t in (q, k))
    target = tuple(t.to(DEVICE, dtype) for t in target) if implicit else target.to(DEVICE, dtype)
    kl = attention_kl_qk(q, k, target, reduction="none", backend=backend)
    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q, k))
    s = (q64 @ k64.transpose(-1, -2)) * D ** -0.5
    if implicit:
        want = eager_kl_rows(s, (target[0].double() @ target[1].double().transpose(-1, -2)) * 8 ** -0.5, "logits")
    else:
        want = eager_kl_rows(s, target, "probs")
    assert_same(kl, want, dtype, grad=True, name="kl rows")
    assert want.isnan().any()
    r = randn(kl.shape, gen).to(DEVICE)
    dq, dk = torch.autograd.grad(kl, (q, k), r)
    finite = torch.isfinite(want)
    edq, = torch.autograd.grad(torch.where(finite, want, 0.0), q64, r.double())
    assert_same(dq[finite], edq[finite], dtype, grad=True, name="dq (finite rows)")
    assert bool(dq[~finite].isnan().all()), "NaN rows get NaN in dq"
    assert dk.isnan().any(), "NaN rows reach dk (as in eager autograd)"


FUSED_CASES = [
    dict(id="target_nan", idx=(0, 0, 4, 9), value=NAN, mask=False),
    dict(id="target_+inf", idx=(1, 0, 1, 2), value=INF, mask=False),
    # a NaN target entry at a key the row does not attend is never read: the row stays finite
    dict(id="target_nan_masked_key", idx=(0, 0, 4, 11), value=NAN, mask=True),
    dict(id="k_nan", idx=None, value=NAN, mask=True),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in FUSED_CASES])
@pytest.mark.parametrize("backend,dtype", _attention_params([torch.float32]))
def test_fused_kl_nonfinite(backend, dtype, case):
    """interaction_attention(..., kl_target=t): the KL of the attended keys (t renormalised there)
    against F.kl_div; NaN / +inf in the target or NaN in k make the affected rows NaN (dq NaN
    there), NaN target entries at masked keys are never read, rows with no attended key give 0."""
    gen = make_gen("numerics_fused", case["id"])
    q, k, v = randn((KB, KH, KM, D), gen), randn((KB, KH, KN, D), gen), randn((KB, KH, KN, D), gen)
    target = torch.softmax(randn((KB, 1, KM, KN), gen), -1)
    mask = None
    if case["mask"]:
        mask = torch.ones(KB, 1, KM, KN, dtype=torch.bool)
        mask[..., 11] = False
        mask[1, :, 3] = False  # a row with no attended key: KL 0, out 0
        mask = mask.to(DEVICE)
    if case["idx"] is not None:
        target[case["idx"]] = case["value"]
    else:
        k[0, 1, 20, 2] = NAN
    q, k, v = (t.to(DEVICE, dtype).requires_grad_(True) for t in (q, k, v))
    target = target.to(DEVICE, dtype)
    out, kl = interaction_attention(q, k, v, mask, kl_target=target, kl_reduction="none", backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_out, _ = eager_attention(q64, k64, v64, mask)
    s = (q64 @ k64.transpose(-1, -2)) * D ** -0.5
    want = eager_kl_rows(s, target, "probs", key_mask=mask)
    assert_same(out, ref_out, dtype, name="out")
    assert_same(kl, want, dtype, grad=True, name="kl rows")
    if mask is not None:
        assert bool((kl[1, :, 3] == 0).all()) and bool((out[1, :, 3] == 0).all())
    r = randn(kl.shape, gen).to(DEVICE)
    (dq,) = torch.autograd.grad(kl, q, r)
    finite = torch.isfinite(want)
    (edq,) = torch.autograd.grad(torch.where(finite, want, 0.0), q64, r.double())
    assert_same(dq[finite], edq[finite], dtype, grad=True, name="dq (finite rows)")
    assert bool(dq[~finite].isnan().all()), "NaN rows get NaN in dq"


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES
                                  if c["id"] in ("q_nan", "v_nan", "dead_rows_with_nans", "all_scores_-inf_no_mask")])
@pytest.mark.parametrize("backend,dtype", _attention_params([torch.float32]))
def test_dropout_path_nonfinite(backend, dtype, case):
    """dropout_p > 0 (the eager path every backend falls back to): the maps (pre-dropout) are as
    without dropout, and out has NaN exactly where eager has it (dropout's zeros do not hide a NaN:
    0 * NaN is NaN) and zeros on rows with no attended key."""
    q, k, v, mask, kw = _attention_inputs(case, dtype)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # triton / cuda warn once that dropout falls back to the eager path
        warnings.simplefilter("ignore")
        out, w = interaction_attention(q, k, v, mask, dropout_p=0.3, need_weights=True, backend=backend, **kw)
    ref_out, ref_p = eager_attention(q, k, v, mask, is_causal=kw.get("is_causal", False))
    assert_same(w, ref_p, dtype, name="weights")
    assert torch.equal(out.isnan().cpu(), ref_out.isnan().cpu()), "out: NaN positions differ from eager"
    dead = ((ref_p == 0).all(-1) & ~ref_p.isnan().any(-1)).cpu()
    assert bool((out.cpu()[dead] == 0).all()), "rows with no attended key must be zeros"
