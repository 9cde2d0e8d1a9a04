"""Hypothesis shape fuzz: random (B, H, Hkv, M, N, D), masks, causal and map options, float32,
every backend against the float64 reference (outputs, maps, and gradients for some examples)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from helpers import BACKEND_PARAMS
from helpers import bool_mask
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from helpers import run_and_compare

MASK_KINDS = ["none", "bool", "float", "float_neginf"]
MASK_SHAPES = ["MN", "B11N", "1HMN", "BHMN", "B1M1"]


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    M = draw(st.integers(1, 40))
    N = draw(st.integers(1, 40))
    D = draw(st.sampled_from([8, 16, 24, 40, 64]))
    Dv = draw(st.sampled_from([D, D, 16]))
    mask_kind = draw(st.sampled_from(MASK_KINDS))
    mask_shape = draw(st.sampled_from(MASK_SHAPES))
    causal = draw(st.booleans())
    need_weights = draw(st.booleans())
    average = need_weights and draw(st.booleans())
    rows = None
    if need_weights and draw(st.booleans()):
        start = draw(st.integers(0, M - 1))
        rows = (start, draw(st.integers(start + 1, M)))
    loss = draw(st.sampled_from(["out", "weights", "both"] if need_weights else ["out"]))
    grads = draw(st.integers(0, 2)) == 0  # gradients for about a third of the examples
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, H=H, Hkv=Hkv, M=M, N=N, D=D, Dv=Dv, mask_kind=mask_kind, mask_shape=mask_shape,
                causal=causal, need_weights=need_weights, average=average, rows=rows, loss=loss,
                grads=grads, seed=seed)


def _mask(c, gen):
    B, H, M, N = c["B"], c["H"], c["M"], c["N"]
    shape = {"MN": (M, N), "B11N": (B, 1, 1, N), "1HMN": (1, H, M, N), "BHMN": (B, H, M, N),
             "B1M1": (B, 1, M, 1)}[c["mask_shape"]]
    if c["mask_kind"] == "none":
        return None
    if c["mask_kind"] == "bool":
        return bool_mask(shape, gen, p_true=0.75)
    return float_mask(shape, gen, neg_inf_frac=0.3 if c["mask_kind"] == "float_neginf" else 0.0)


# The backend axis as a parametrize, not conftest's `backend` fixture: hypothesis refuses function-scoped
# fixtures in a @given test (HealthCheck.function_scoped_fixture).
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases())
def test_fuzz_against_reference(backend, c):
    gen = make_gen("fuzz", c["seed"])
    q, k, v = make_qkv(c["B"], c["H"], c["Hkv"], c["M"], c["N"], c["D"], c["Dv"], gen=gen,
                       requires_grad=c["grads"])
    mask = _mask(c, gen)
    run_and_compare(backend, q, k, v, mask, is_causal=c["causal"], need_weights=c["need_weights"],
                    average=c["average"], rows=c["rows"], loss=c["loss"] if c["grads"] else None, gen=gen)
