"""lfi.ops.attention_kl API: validate=True, the custom ops (opcheck, row statistics), bad input
(ValueError / TypeError naming the argument), and a hypothesis property test on the torch backend.
Against the float64 references of tests/reference.py (how: tests/kl_cases.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import DEVICE
from helpers import assert_close
from helpers import case_params
from helpers import make_gen
from helpers import randn
from kl_cases import REDUCTIONS
from kl_cases import TARGET_KINDS
from kl_cases import key_mask_of
from kl_cases import key_mask_with_empty_row
from kl_cases import make_target
from lfi.ops import attention_kl
from reference import NEG_INF
from reference import ref_kl_rows
from reference import ref_reduce

# --------------------------------------------------------------------------------------------------
# validate=True
# --------------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("case", case_params(OPCHECK_CASES))
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
    key_mask = key_mask_with_empty_row(B, M, N, gen, 0.6, row=3)
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
    from hypothesis import HealthCheck
    from hypothesis import given
    from hypothesis import settings
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
