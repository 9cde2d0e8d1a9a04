"""lfi.ops.attention_kl_qk numerics: student / teacher logits ~1e4, rows of -1e30, zeros in the
target, fully masked rows. Against the float64 references of tests/reference.py (how:
tests/kl_cases.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import DEVICE
from helpers import case_params
from helpers import detached64
from helpers import make_gen
from helpers import randn
from kl_cases import check_kl_qk
from kl_cases import implicit_teacher
from kl_cases import make_target
from lfi.ops import attention_kl_qk
from reference import ref_kl_qk_rows
from reference import ref_student_logits
from reference import ref_teacher_logits

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


@pytest.mark.parametrize("case", case_params(LARGE_CASES))
def test_large_logits_stable(backend, case):
    """Student and/or teacher logits ~1e4 (explicit scales 1): finite loss and gradients.

    The kernels form q.k in fp32, so each logit of size ~1e4 carries a rounding error of about an ulp
    of 1e4 (~1e-3) that no fp32 algorithm avoids; the tolerances are a few such ulps, propagated
    (KL: / T; gradients: times the other operand's size). Precision lost *beyond* the logits'
    rounding is tested with exact logits in test_attention_kl_numerics.py::test_large_logits_stable."""
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
        target, kw = implicit_teacher(B, M, N, 8, gen), dict(scale=1.0, temperature=2.0)
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
    kl, dq, _ = check_kl_qk(backend, q, k, implicit_teacher(B, M, N, 8, gen), key_mask=key_mask,
                            gen=gen)
    assert (kl[0, :, 2] == 0).all() and (dq[0, :, 2] == 0).all()


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_huge_magnitude_rows(backend, where):
    """A query row whose logits (student's or implicit teacher's) are all -1e30 (a constant key
    component times a huge query entry): the row is a uniform distribution, and the backward must
    see it as one. Folding the row statistics into one logsumexp made p = 1 (or t = 1) per key."""
    gen = make_gen("kl_qk_huge", backend, where)
    B, H, M, N, D, Dt = 1, 2, 4, 21, 16, 8
    q, k = randn((B, H, M, D), gen), randn((B, 1, N, D), gen)
    q_t, k_t = randn((B, 1, M, Dt), gen), randn((B, 1, N, Dt), gen)
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
    r = randn(kl.shape, gen)
    (got,) = torch.autograd.grad(kl, q, r)
    (exp,) = torch.autograd.grad(want, q64, r.double())
    assert torch.isfinite(got).all()
    # the huge row's own dq is ~0 (uniform p against the teacher), the others are O(1)
    torch.testing.assert_close(got.double(), exp, atol=1e-5 * exp.abs().max().item(), rtol=1e-4)
