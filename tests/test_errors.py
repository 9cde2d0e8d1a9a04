"""Bad inputs raise ValueError/TypeError whose message names the offending argument (and the
expected shape/dtype); NaN inputs propagate instead of crashing."""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE
from helpers import HAS_CUDA
from helpers import assert_close
from helpers import backend_param
from helpers import backend_supports
from helpers import detached64
from helpers import make_gen
from helpers import make_qkv
from lfi.ops import interaction_attention
from reference import reference_attention

B, H, M, N, D = 2, 2, 5, 7, 16


def _all(*patterns):
    """A regex that matches when every pattern occurs somewhere in the message."""
    return "(?s)" + "".join(f"(?=.*{p})" for p in patterns)


def _t(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=g)
    if dtype.is_floating_point:
        t = t.to(dtype)
    elif dtype == torch.bool:
        t = t > 0
    else:
        t = (t * 3).to(dtype)
    return t.to(DEVICE)


def _base():
    return dict(q=_t(B, H, M, D), k=_t(B, H, N, D), v=_t(B, H, N, D))


def _with(**over):
    def build():
        kw = _base()
        kw.update({k: (v() if callable(v) else v) for k, v in over.items()})
        return kw
    return build


Q, K, V, MASK = r"\bq\b", r"\bk\b", r"\bv\b", r"\battn_mask\b"

# (id, kwargs builder, exception types, regex the message must match)
CASES = [
    # wrong ndim / not a tensor
    ("q_2d", _with(q=lambda: _t(M, D)), ValueError, Q),
    ("q_5d", _with(q=lambda: _t(1, B, H, M, D)), ValueError, Q),
    ("k_3d_q_4d", _with(k=lambda: _t(B, N, D)), ValueError, K),
    ("v_5d", _with(v=lambda: _t(1, B, H, N, D)), ValueError, V),
    ("q_not_tensor", _with(q=[[1.0]]), TypeError, Q),
    # shape mismatches
    ("batch_k", _with(k=lambda: _t(B + 1, H, N, D), v=lambda: _t(B + 1, H, N, D)), ValueError, K),
    ("batch_v", _with(v=lambda: _t(B + 1, H, N, D)), ValueError, V),
    ("heads_not_divisible", _with(q=lambda: _t(B, 3, M, D)), ValueError, _all(K, "(H|head)")),
    ("heads_k_vs_v", _with(v=lambda: _t(B, 1, N, D)), ValueError, V),
    ("head_dim_q_vs_k", _with(k=lambda: _t(B, H, N, D + 8)), ValueError, K),
    ("len_k_vs_v", _with(v=lambda: _t(B, H, N + 1, D)), ValueError, V),
    ("head_dim_257", _with(q=lambda: _t(B, H, M, 257), k=lambda: _t(B, H, N, 257)), ValueError,
     _all(Q, "256")),
    ("v_head_dim_300", _with(v=lambda: _t(B, H, N, 300)), ValueError, _all(V, "256")),
    # dtypes
    ("mixed_dtype_v", _with(v=lambda: _t(B, H, N, D, dtype=torch.float64)), (TypeError, ValueError), V),
    ("mixed_dtype_k", _with(k=lambda: _t(B, H, N, D, dtype=torch.float16)), (TypeError, ValueError), K),
    ("int_q", _with(q=lambda: _t(B, H, M, D, dtype=torch.int64)), TypeError, Q),
    ("int_k", _with(k=lambda: _t(B, H, N, D, dtype=torch.int32)), TypeError, K),
    ("int_v", _with(v=lambda: _t(B, H, N, D, dtype=torch.int16)), TypeError, V),
    ("bool_q", _with(q=lambda: _t(B, H, M, D, dtype=torch.bool)), TypeError, Q),
    # masks
    ("mask_bad_N", _with(attn_mask=lambda: _t(M, N + 1) > 0), ValueError, MASK),
    ("mask_bad_M", _with(attn_mask=lambda: _t(M + 2, N)), ValueError, MASK),
    ("mask_bad_B", _with(attn_mask=lambda: _t(B + 1, 1, M, N) > 0), ValueError, MASK),
    ("mask_bad_H", _with(attn_mask=lambda: _t(1, H + 1, M, N)), ValueError, MASK),
    ("mask_5d", _with(attn_mask=lambda: _t(1, B, H, M, N) > 0), ValueError, MASK),
    ("mask_int64", _with(attn_mask=lambda: _t(M, N, dtype=torch.int64)), TypeError, MASK),
    ("mask_uint8", _with(attn_mask=lambda: _t(M, N, dtype=torch.uint8)), TypeError, MASK),
    ("mask_not_tensor", _with(attn_mask=[[True] * N] * M), TypeError, MASK),
    # weights options
    ("rows_stop_past_M", _with(need_weights=True, weights_rows=(0, M + 1)), ValueError, "weights_rows"),
    ("rows_negative_start", _with(need_weights=True, weights_rows=(-1, 3)), ValueError, "weights_rows"),
    ("rows_start_eq_stop", _with(need_weights=True, weights_rows=(3, 3)), ValueError, "weights_rows"),
    ("rows_start_gt_stop", _with(need_weights=True, weights_rows=(4, 2)), ValueError, "weights_rows"),
    ("rows_not_pair", _with(need_weights=True, weights_rows=(1, 2, 3)), (TypeError, ValueError), "weights_rows"),
    ("rows_without_need_weights", _with(weights_rows=(0, 2)), ValueError, "weights_rows"),
    ("average_without_need_weights", _with(average_attn_weights=True), ValueError,
     "(average_attn_weights|need_weights)"),
    # scalars
    ("dropout_negative", _with(dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout_one", _with(dropout_p=1.0), ValueError, "dropout_p"),
    ("dropout_above_one", _with(dropout_p=1.5), ValueError, "dropout_p"),
    ("dropout_string", _with(dropout_p="0.1"), (TypeError, ValueError), "dropout_p"),
    ("scale_nan", _with(scale=float("nan")), (TypeError, ValueError), "scale"),
    ("scale_inf", _with(scale=float("inf")), (TypeError, ValueError), "scale"),
    ("scale_string", _with(scale="0.5"), (TypeError, ValueError), "scale"),
]


@pytest.mark.parametrize("build,exc,pattern", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(build, exc, pattern, backend):
    kwargs = build()
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(exc, match=pattern):
        interaction_attention(q, k, v, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["cuda_fast", "Torch", "", "flash"])
def test_unknown_backend(backend):
    kw = _base()
    with pytest.raises(ValueError, match="backend") as info:
        interaction_attention(kw["q"], kw["k"], kw["v"], backend=backend)
    msg = str(info.value)
    for name in ("auto", "torch", "triton"):
        assert name in msg, f"the error should list the valid backends, got: {msg}"


def test_backend_not_a_string():
    kw = _base()
    with pytest.raises((TypeError, ValueError), match="backend"):
        interaction_attention(kw["q"], kw["k"], kw["v"], backend=None)


# Backends that refuse float64 on DEVICE, with the error they raise: Triton everywhere; the cuda
# backend's CUDA kernels (its CPU kernels run float64: helpers.backend_supports).
FLOAT64_ERRORS = {"triton": ((TypeError, ValueError), "(float64|fp64|dtype)"), "cuda": (TypeError, "float64")}


def _float64_error_params():
    out = []
    for name in FLOAT64_ERRORS:
        p = backend_param(name)
        if backend_supports(name, torch.float64):
            p = pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.skip(
                reason=f"backend={name!r} runs float64 on {DEVICE.type} (only its CUDA kernels refuse it)")])
        out.append(p)
    return out


@pytest.mark.parametrize("backend", _float64_error_params())
def test_float64_rejected(backend):
    """float64 where a backend has no kernels for it is a clear error naming the dtype."""
    exc, pattern = FLOAT64_ERRORS[backend]
    q, k, v = (t.double() for t in _base().values())
    with pytest.raises(exc, match=pattern):
        interaction_attention(q, k, v, backend=backend)


def test_float64_torch_backend_ok():
    q, k, v = (t.double() for t in _base().values())
    out = interaction_attention(q, k, v, backend="torch")
    assert out.dtype == torch.float64


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device to mix devices")
@pytest.mark.parametrize("which", ["k", "v", "attn_mask"])
def test_mixed_devices(which):
    kw = {n: t.cuda() for n, t in _base().items()}
    kw["attn_mask"] = torch.ones(M, N, dtype=torch.bool, device="cuda")
    kw[which] = kw[which].cpu()
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    with pytest.raises((ValueError, TypeError, RuntimeError), match=rf"\b{which}\b|device"):
        interaction_attention(q, k, v, **kw)


def test_nan_in_q_propagates(backend):
    """A NaN in one query row gives NaN in that output row only; no crash, other rows exact."""
    gen = make_gen("nan", backend)
    q, k, v = make_qkv(2, 2, 1, 20, 37, 16, gen=gen)
    q[1, 0, 17, 3] = float("nan")
    out, w = interaction_attention(q, k, v, need_weights=True, backend=backend)
    out = out.cpu()
    assert out[1, 0, 17].isnan().all(), "the NaN row of q must give a NaN output row"
    keep = torch.ones(out.shape[:3], dtype=torch.bool)
    keep[1, 0, 17] = False
    ref_out, ref_p = reference_attention(*detached64(q, k, v))
    assert_close(out[keep], ref_out.cpu()[keep], torch.float32, name="out (rows without NaN)")
    assert_close(w.cpu()[keep], ref_p.cpu()[keep], torch.float32, name="weights (rows without NaN)")
