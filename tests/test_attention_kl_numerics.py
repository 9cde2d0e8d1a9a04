"""lfi.ops.attention_kl numerics: |logits| ~ 1e4, rows of -1e30 / finfo.min / +3e8, zeros in the
target, fully masked rows, zero-mass rows, -inf student logits. Against the float64 references of
tests/reference.py (how: tests/kl_cases.py).
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE
from helpers import assert_close
from helpers import backend_params
from helpers import detached64
from helpers import make_gen
from helpers import randn
from kl_cases import REDUCTIONS
from kl_cases import TARGET_KINDS
from kl_cases import check_kl
from kl_cases import make_target
from lfi.ops import attention_kl
from reference import NEG_INF
from reference import ref_kl_rows

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


@pytest.mark.parametrize("backend,case", backend_params(cases=LARGE_CASES))
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


@pytest.mark.parametrize("where,value", HUGE_ROWS)
def test_huge_magnitude_rows(backend, where, value):
    """A row whose logits are all ~value (|value| >> log N, so value + log N rounds to value): the
    saved statistics keep (row max, log l) apart, so the backward's softmax is still 1/N-exact.
    With one fp32 logsumexp the gradient of such a row was off by (N - 1) / N."""
    gen = make_gen("kl_huge", backend, where, str(value))
    B, H, M, N = 1, 2, 3, 37
    logits = randn((B, H, M, N), gen, scale=2.0)
    target = randn((B, H, M, N), gen, scale=2.0)
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
    r = randn(kl.shape, gen)
    (got,) = torch.autograd.grad(kl, logits, r)
    exp = r.double()[..., None] * (torch.softmax(lg64.detach(), -1) - torch.softmax(target.double(), -1))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), exp, atol=1e-5 * r.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("target_is", TARGET_KINDS)
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
