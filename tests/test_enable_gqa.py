"""interaction_attention's enable_gqa keyword, with F.scaled_dot_product_attention's meaning.

SDPA (torch 2.14.1): enable_gqa=False (its default) with H != Hkv raises a RuntimeError (on CPU, the
math kernel's "The size of tensor a (H) must match the size of tensor b (Hkv) at non-singleton
dimension 1"); enable_gqa=True allows H % Hkv == 0. lfi: True and False as SDPA; the default None
keeps lfi's implicit grouped-query heads (every call SDPA accepts behaves the same; see README).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import BACKEND_PARAMS
from helpers import make_gen
from helpers import make_qkv
from lfi.ops import interaction_attention
from lfi.ops._validation import ArgumentTypeError


def test_sdpa_reference_behaviour():
    """What lfi mirrors, checked on the installed torch (so a change in SDPA shows up here)."""
    q, k, v = make_qkv(1, 4, 2, 3, 5, 8, gen=make_gen("sdpa_gqa"))
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=False)
    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("backend", ["auto"] + BACKEND_PARAMS)
def test_enable_gqa(backend):
    gen = make_gen("enable_gqa", backend)
    q, k, v = make_qkv(2, 4, 2, 3, 5, 8, gen=gen)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for flag in (True, None):
        got = interaction_attention(q, k, v, enable_gqa=flag, backend=backend)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    with pytest.raises(RuntimeError, match=r"enable_gqa=False but q has H=4 heads and k, v have Hkv=2"):
        interaction_attention(q, k, v, enable_gqa=False, backend=backend)
    with pytest.raises(RuntimeError, match="enable_gqa=False"):  # with maps too, before any kernel runs
        interaction_attention(q, k, v, enable_gqa=False, need_weights=True, backend=backend)
    # equal head counts: every value means the same
    q2, k2, v2 = make_qkv(2, 2, 2, 3, 5, 8, gen=gen)
    want = F.scaled_dot_product_attention(q2, k2, v2)
    for flag in (False, True, None):
        torch.testing.assert_close(interaction_attention(q2, k2, v2, enable_gqa=flag, backend=backend), want,
                                   atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("bad", [1, 0, "yes", 1.0, torch.tensor(True)])
def test_enable_gqa_must_be_bool_or_none(bad):
    q, k, v = make_qkv(1, 2, 2, 3, 5, 8, gen=make_gen("enable_gqa_bad"))
    with pytest.raises(ArgumentTypeError, match="enable_gqa must be a bool or None"):
        interaction_attention(q, k, v, enable_gqa=bad, backend="torch")


def test_enable_gqa_is_keyword_only():
    """As in SDPA (scale and enable_gqa are keyword-only there; lfi's scale is also positional)."""
    q, k, v = make_qkv(1, 2, 2, 3, 5, 8, gen=make_gen("enable_gqa_kw"))
    with pytest.raises(TypeError):
        interaction_attention(q, k, v, None, 0.0, False, None, True)
