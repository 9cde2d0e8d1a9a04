"""The numerics contract of README "Numerics" for the KL ops (attention_kl, attention_kl_qk, the KL
fused into interaction_attention), on every backend of the matrix: NaN / inf in the student logits,
q, k, a dense target or an implicit teacher; KL with target mass on keys the student gives -inf.
Compared with helpers.assert_same against F.kl_div in float64 (reference.eager_kl_rows); the rules
and the attention cases: test_numerics_contract.py.
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE
from helpers import INTERPRETED
from helpers import as_gpu_nans
from helpers import assert_same
from helpers import backend_dtype_params
from helpers import force_exact_fp32_split
from helpers import make_gen
from helpers import randn
from kl_cases import implicit_teacher
from kl_cases import make_target
from lfi.ops import attention_kl
from lfi.ops import attention_kl_qk
from lfi.ops import interaction_attention
from reference import eager_attention
from reference import eager_kl_rows
from reference import eager_target_probs

# The Triton CPU interpreter evaluates with numpy, which warns on the non-finite values these cases are about
# (beyond helpers.INTERPRETER_NOISE, which conftest.py filters everywhere).
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

NAN, INF = float("nan"), float("inf")
D = 16


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
    target = make_target((KB, 1, KM, KN), case["target_is"], gen)
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
@pytest.mark.parametrize("backend,dtype", backend_dtype_params([torch.float32]))
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
        t = eager_target_probs(target, case["target_is"], case["T"], keep)
        g_exp = r.double()[..., None] * (p - t) / case["T"]
        assert_same(got[inf_rows], g_exp[inf_rows], dtype, grad=True, name="dlogits (+inf rows)")


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
@pytest.mark.parametrize("backend,dtype", backend_dtype_params([torch.float32]))
def test_attention_kl_qk_nonfinite(backend, dtype, case):
    """attention_kl_qk against F.kl_div on the materialised logits: NaN in q, k, a dense target or
    an implicit teacher's q_t makes the affected rows NaN (dq NaN there); the other rows match."""
    gen = make_gen("numerics_kl_qk", case["id"])
    q, k = randn((KB, KH, KM, D), gen), randn((KB, 1, KN, D), gen)
    implicit = case["where"] == "q_t"
    if implicit:
        target = implicit_teacher(KB, KM, KN, 8, gen)
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
@pytest.mark.parametrize("backend,dtype", backend_dtype_params([torch.float32]))
def test_fused_kl_nonfinite(backend, dtype, case):
    """interaction_attention(..., kl_target=t): the KL of the attended keys (t renormalised there)
    against F.kl_div; NaN / +inf in the target or NaN in k make the affected rows NaN (dq NaN
    there), NaN target entries at masked keys are never read, rows with no attended key give 0."""
    _check_fused_kl_nonfinite(backend, dtype, case)


@pytest.mark.skipif(not INTERPRETED, reason="forces the Triton kernels' exact-float32 split under the CPU interpreter")
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in FUSED_CASES])
def test_fused_kl_nonfinite_3xtf32(case, monkeypatch):
    """The same through the exact-float32 split of CUDA devices, NaNs as GPUs compute them
    (test_numerics_contract.py test_attention_nonfinite_inputs_3xtf32)."""
    force_exact_fp32_split(monkeypatch)
    _check_fused_kl_nonfinite("triton", torch.float32, case, gpu_nan=True)


def _check_fused_kl_nonfinite(backend, dtype, case, gpu_nan=False):
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
    if gpu_nan:
        as_gpu_nans(k, target)
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
