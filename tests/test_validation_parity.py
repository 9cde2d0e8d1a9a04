"""Validation parity across the public ops (issue 13): every argument they share is checked the
same way, and every error names the argument and what was expected."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lfi
from helpers import BACKEND_PARAMS
from helpers import DEVICE
from lfi.ops import attention_kl
from lfi.ops import attention_kl_qk
from lfi.ops import interaction_attention

B, H, M, N, D = 2, 2, 3, 5, 8


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=DEVICE, dtype=dtype)


def _probs(*shape):
    return torch.softmax(_x(*shape), -1)


def _call(op, **kw):
    """Calls `op` on small valid inputs with the keyword arguments `kw`."""
    if op == "interaction_attention":
        return interaction_attention(_x(B, H, M, D), _x(B, H, N, D), _x(B, H, N, D), **kw)
    if op == "attention_kl":
        return attention_kl(_x(B, H, M, N), _probs(B, 1, M, N), **kw)
    return attention_kl_qk(_x(B, H, M, D), _x(B, H, N, D), _probs(B, 1, M, N), **kw)


def _call_implicit(**kw):
    """attention_kl_qk with an implicit (q_t, k_t) teacher (the case where scale_t applies)."""
    return attention_kl_qk(_x(B, H, M, D), _x(B, H, N, D), (_x(B, 1, M, 4), _x(B, 1, N, 4)), **kw)


ALL_OPS = ["interaction_attention", "attention_kl", "attention_kl_qk"]
BAD_REALS = [
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param(float("inf"), ValueError, id="inf"),
    pytest.param(float("-inf"), ValueError, id="-inf"),
    pytest.param("a", TypeError, id="str"),
    pytest.param("0.5", TypeError, id="numeric_str"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(torch.tensor(0.5), TypeError, id="tensor"),
    pytest.param([0.5], TypeError, id="list"),
]


# 1. weights_rows: ints only, never coerced ------------------------------------------------------

@pytest.mark.parametrize("rows", [
    pytest.param((0.5, 1.9), id="floats"),
    pytest.param((0, 2.0), id="float_stop"),
    pytest.param("01", id="str"),
    pytest.param((True, 2), id="bool_item"),
    pytest.param(("0", "1"), id="str_items"),
    pytest.param(slice(0.5, 2), id="float_slice"),
    pytest.param(1, id="int"),
    pytest.param(True, id="bool"),
    pytest.param((0, 1, 2), id="triple"),
])
def test_weights_rows_must_be_ints(rows, backend):
    with pytest.raises((TypeError, ValueError), match="weights_rows") as info:
        interaction_attention(_x(B, H, M, D), _x(B, H, N, D), _x(B, H, N, D), need_weights=True,
                              weights_rows=rows, backend=backend)
    assert "pair of ints" in str(info.value)


@pytest.mark.parametrize("rows,expect", [((0, 2), (0, 2)), ([1, 3], (1, 3)), (slice(-2, None), (1, 3)),
                                         (torch.tensor([0, 1]), (0, 1))])
def test_weights_rows_valid_forms(rows, expect):
    _, w = interaction_attention(_x(B, H, M, D), _x(B, H, N, D), _x(B, H, N, D), need_weights=True,
                                 weights_rows=rows, backend="torch")
    assert w.shape == (B, H, expect[1] - expect[0], N)


# 2. float arguments: one checker, the same rules in every op ---------------------------------

@pytest.mark.parametrize("value,exc", BAD_REALS)
@pytest.mark.parametrize("op", ["interaction_attention", "attention_kl_qk"])
def test_scale_is_a_finite_real(op, value, exc):
    with pytest.raises(exc, match=r"\bscale\b.*finite real number"):
        _call(op, scale=value)


@pytest.mark.parametrize("value,exc", BAD_REALS)
def test_scale_t_is_a_finite_real(value, exc):
    with pytest.raises(exc, match=r"\bscale_t\b.*finite real number"):
        _call_implicit(scale_t=value)


@pytest.mark.parametrize("value,exc", [*BAD_REALS, pytest.param(0.0, ValueError, id="zero"),
                                       pytest.param(-1.0, ValueError, id="negative")])
@pytest.mark.parametrize("op", ["attention_kl", "attention_kl_qk"])
def test_temperature_is_a_positive_finite_real(op, value, exc):
    with pytest.raises(exc, match=r"temperature.*> 0"):
        _call(op, temperature=value)


@pytest.mark.parametrize("value,exc", [*BAD_REALS, pytest.param(1.0, ValueError, id="one"),
                                       pytest.param(-0.1, ValueError, id="negative")])
def test_dropout_p_in_unit_interval(value, exc):
    with pytest.raises(exc, match=r"dropout_p.*\[0, 1\)"):
        _call("interaction_attention", dropout_p=value)


def test_type_errors_are_also_value_errors():
    """The KL ops raised ValueError for a bad temperature type before: both still catch it."""
    for exc in (TypeError, ValueError):
        with pytest.raises(exc, match="temperature"):
            _call("attention_kl", temperature="1")


@pytest.mark.parametrize("op", ALL_OPS)
def test_valid_reals_accepted(op):
    import numpy as np
    kw = {"attention_kl": dict(temperature=np.float32(2.0)),
          "attention_kl_qk": dict(scale=1, temperature=2, scale_t=None),
          "interaction_attention": dict(scale=np.float64(0.25), dropout_p=0)}[op]
    assert torch.isfinite(_call(op, backend="torch", **kw)).all()


# 3. environment variables ----------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["abc", "0", "-5", "1.5", "64MB"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_chunk_bytes_env_parsed(monkeypatch, op, raw):
    monkeypatch.setenv("LFI_TORCH_CHUNK_BYTES", raw)
    kw = {"need_weights": True} if op == "interaction_attention" else {}  # our kernels, not SDPA
    with pytest.raises(ValueError, match=r"LFI_TORCH_CHUNK_BYTES.*positive integer.*" + repr(raw)):
        _call(op, backend="torch", **kw)


@pytest.mark.parametrize("raw", ["", "  ", "4096"])
def test_chunk_bytes_env_valid(monkeypatch, raw):
    monkeypatch.setenv("LFI_TORCH_CHUNK_BYTES", raw)
    out, w = _call("interaction_attention", backend="torch", need_weights=True)
    assert out.shape == (B, H, M, D) and w.shape == (B, H, M, N)


# 4. empty dims ------------------------------------------------------------------------------------

EMPTY = [pytest.param(s, id=name) for name, s in
         (("B0", (0, H, H, M, N)), ("H0", (B, 0, 0, M, N)), ("H0_Hkv1", (B, 0, 1, M, N)),
          ("M0", (B, H, H, 0, N)), ("N0", (B, H, H, M, 0)), ("gqa_M0", (B, 4, 2, 0, N)))]


@pytest.mark.parametrize("shape", EMPTY)
@pytest.mark.parametrize("backend", ["auto", *BACKEND_PARAMS])
def test_empty_dims_match_sdpa(shape, backend):
    """B, H, M or N = 0: what F.scaled_dot_product_attention returns (empty outputs; N = 0: every
    row fully masked -> zeros), empty or zero maps and KL, and zero gradients."""
    b, h, hkv, m, n = shape
    q, k, v = (_x(*s).requires_grad_() for s in ((b, h, m, D), (b, hkv, n, D), (b, hkv, n, D)))
    out, w, kl = interaction_attention(q, k, v, need_weights=True, kl_target=_probs(b, 1, m, n), backend=backend)
    gqa = {"enable_gqa": True} if h != hkv else {}
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), **gqa)
    assert out.shape == ref.shape and torch.equal(out, ref)
    assert w.shape == (b, h, m, n) and not w.isnan().any()
    assert kl.item() == 0.0
    (out.sum() + w.sum() + kl).backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and not t.grad.any()
    mean_maps = interaction_attention(q, k, v, need_weights=True, average_attn_weights=True, backend=backend)[1]
    assert mean_maps.shape == (b, m, n) and not mean_maps.isnan().any()


@pytest.mark.parametrize("shape", EMPTY)
def test_empty_dims_kl_qk_names_the_dim(shape):
    b, h, hkv, m, n = shape
    name = next(f"{x}=0" for x, size in zip("BHMN", (b, h, m, n)) if size == 0)
    with pytest.raises(ValueError, match=name):
        attention_kl_qk(_x(b, h, m, D), _x(b, hkv, n, D), _probs(b, 1, m, n))


@pytest.mark.parametrize("dim", range(4))
def test_empty_dims_kl_names_the_dim(dim):
    shape = [B, H, M, N]
    shape[dim] = 0
    with pytest.raises(ValueError, match=f"student_logits.*{'BHMN'[dim]}=0"):
        attention_kl(_x(*shape), _probs(*shape))


@pytest.mark.parametrize("op", ["interaction_attention", "attention_kl_qk"])
def test_zero_kv_heads_names_k(op):
    """H = 0 is an empty batch of heads, not a GQA problem; Hkv = 0 under H > 0 is a bad k."""
    with pytest.raises(ValueError, match=r"\bk has Hkv=0"):
        if op == "interaction_attention":
            interaction_attention(_x(B, H, M, D), _x(B, 0, N, D), _x(B, 0, N, D))
        else:
            attention_kl_qk(_x(B, H, M, D), _x(B, 0, N, D), _probs(B, 1, M, N))


# 5. capture_attention rows ------------------------------------------------------------------------

@pytest.mark.parametrize("rows,exc", [
    ((5, 2), ValueError), ((3, 3), ValueError), ((-1, -3), ValueError), (slice(4, 1), ValueError),
    ((0.5, 2), TypeError), ("01", TypeError), (True, TypeError), ((0, 1, 2), TypeError), (1.0, TypeError),
    (slice(0, 4, 2), ValueError),
])
def test_capture_rows_message(rows, exc):
    with pytest.raises(exc, match=r"rows") as info:
        with lfi.capture_attention(torch.nn.Linear(2, 2), rows=rows):
            pass
    msg = str(info.value)
    assert "9223372036854775807" not in msg
    assert repr(rows) in msg and "(start, stop) pair of ints" in msg


# 6. resolve_layers --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,exc", [(1.0, TypeError), (None, TypeError), (True, TypeError), ([1.0], TypeError),
                                      ([True], TypeError), ("sometimes", ValueError), ([7], ValueError),
                                      ([], ValueError)])
def test_resolve_layers_says_what_it_accepts(spec, exc):
    from lfi.models.interaction_vit import resolve_layers  # the application layer: imported here only

    with pytest.raises(exc, match="supervised_layers"):
        resolve_layers(spec, 4)


def test_resolve_layers_valid():
    from lfi.models.interaction_vit import resolve_layers

    assert resolve_layers(1, 4) == [1]
    assert resolve_layers((-1, 0), 4) == [0, 3]
    assert resolve_layers("last2", 4) == [2, 3]
