"""Helpers shared by the test modules (imported after conftest.py set TRITON_INTERPRET)."""
from __future__ import annotations

import importlib.util
import os
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _triton_usable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    # On CPU the Triton backend needs the interpreter (conftest.py sets it when there is no GPU).
    return HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


BACKENDS = ["torch"] + (["triton"] if _triton_usable() else [])

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

# (atol, rtol) for outputs/weights, against a float64 reference computed from the same (rounded)
# inputs. Gradient tolerances are applied with atol scaled by max(1, max|reference|).
FWD_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
GRAD_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def backend_supports(backend: str, dtype: torch.dtype) -> bool:
    return backend == "torch" or dtype != torch.float64


def seed_from(*parts) -> int:
    """A deterministic seed per test case (stable across runs and processes)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def make_gen(*parts) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed_from(*parts))
    return g


def randn(shape, gen, dtype=torch.float32, device=DEVICE, requires_grad=False, scale=1.0):
    """Fresh random normal data (generated on CPU in float32 for reproducibility, then moved)."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
    t = t.to(device=device, dtype=dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def make_qkv(B, H, Hkv, M, N, D, Dv=None, *, dtype=torch.float32, gen, device=DEVICE,
             requires_grad=False, scale=1.0):
    Dv = D if Dv is None else Dv
    q = randn((B, H, M, D), gen, dtype, device, requires_grad, scale)
    k = randn((B, Hkv, N, D), gen, dtype, device, requires_grad, scale)
    v = randn((B, Hkv, N, Dv), gen, dtype, device, requires_grad)
    return q, k, v


def bool_mask(shape, gen, p_true=0.7, device=DEVICE):
    return (torch.rand(*shape, generator=gen) < p_true).to(device)


def float_mask(shape, gen, dtype=torch.float32, device=DEVICE, neg_inf_frac=0.0):
    m = torch.randn(*shape, generator=gen)
    if neg_inf_frac > 0:
        m = m.masked_fill(torch.rand(*shape, generator=gen) < neg_inf_frac, float("-inf"))
    return m.to(device=device, dtype=dtype)


def detached64(*ts):
    """float64 leaf copies (requiring grad when the source does) for the reference."""
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        c = t.detach().to(torch.float64) if t.dtype.is_floating_point else t.detach()
        if t.requires_grad:
            c.requires_grad_(True)
        out.append(c)
    return out


def _describe_mismatch(actual, expected, atol, rtol):
    diff = (actual - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    idx = bad.nonzero()
    first = tuple(idx[0].tolist()) if len(idx) else None
    msg = (f"{int(bad.sum())}/{bad.numel()} elements differ (atol={atol:.3g}, rtol={rtol:.3g}); "
           f"max abs diff {torch.nan_to_num(diff, nan=float('inf')).max().item():.4g}")
    if first is not None:
        msg += f"; first at {first}: got {actual[first].item():.6g}, expected {expected[first].item():.6g}"
    return msg


def assert_close(actual, expected, dtype, *, grad=False, name="tensor"):
    """Full-tensor comparison of `actual` (any dtype) against a float64 `expected`.

    NaN anywhere in `actual` fails (the reference never produces NaN here)."""
    assert actual is not None, f"{name}: got None"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    assert not actual.isnan().any(), f"{name}: contains NaN ({int(actual.isnan().sum())} elements)"
    assert torch.isfinite(actual).all(), f"{name}: contains inf"
    atol, rtol = (GRAD_TOL if grad else FWD_TOL)[dtype]
    if grad and expected.numel():
        atol = atol * max(1.0, expected.abs().max().item())
    ok = torch.allclose(actual, expected, atol=atol, rtol=rtol)
    assert ok, f"{name} ({DTYPE_IDS.get(dtype, dtype)}): " + _describe_mismatch(actual, expected, atol, rtol)


def run_and_compare(backend, q, k, v, attn_mask=None, *, is_causal=False, scale=None,
                    need_weights=False, average=False, rows=None, loss="both", gen=None,
                    dtype=None, check_grads=True):
    """Runs interaction_attention and the float64 reference on the same inputs and compares the
    output, the maps and (for every input that requires grad) the gradients of a random linear
    loss on `loss` in {"out", "weights", "both", None}. Returns (out, weights, grads dict)."""
    from lfi.ops import interaction_attention  # imported late: conftest.py sets TRITON_INTERPRET first
    from reference import reference_attention, select_weights

    dtype = dtype or q.dtype
    gen = gen or make_gen("run_and_compare")
    kwargs = dict(is_causal=is_causal, scale=scale, backend=backend)
    if need_weights:
        kwargs.update(need_weights=True, average_attn_weights=average, weights_rows=rows)
    result = interaction_attention(q, k, v, attn_mask, **kwargs)
    if need_weights:
        assert isinstance(result, tuple) and len(result) == 2
        out, w = result
    else:
        assert isinstance(result, torch.Tensor), "need_weights=False must return a single tensor"
        out, w = result, None

    q64, k64, v64, m64 = detached64(q, k, v, attn_mask)
    ref_out, ref_p = reference_attention(q64, k64, v64, m64, is_causal=is_causal, scale=scale)
    ref_w = select_weights(ref_p, rows, average) if need_weights else None

    assert out.dtype == q.dtype, f"out dtype {out.dtype} != q dtype {q.dtype}"
    assert out.device == q.device
    assert_close(out, ref_out, dtype, name="out")
    if need_weights:
        assert w.dtype == q.dtype, f"weights dtype {w.dtype} != q dtype {q.dtype}"
        assert w.device == q.device
        assert_close(w, ref_w, dtype, name="weights")

    grads = {}
    inputs = {n: t for n, t in zip("qkv", (q, k, v)) if t.requires_grad}
    if attn_mask is not None and attn_mask.requires_grad:
        inputs["attn_mask"] = attn_mask
    if check_grads and loss and inputs:
        refs = {"q": q64, "k": k64, "v": v64, "attn_mask": m64}
        r_out = randn(out.shape, gen, out.dtype, out.device)
        terms, ref_terms = [], []
        if loss in ("out", "both"):
            terms.append((out * r_out).sum())
            ref_terms.append((ref_out * r_out.double()).sum())
        if loss in ("weights", "both"):
            assert need_weights
            r_w = randn(w.shape, gen, w.dtype, w.device)
            terms.append((w * r_w).sum())
            ref_terms.append((ref_w * r_w.double()).sum())
        got = torch.autograd.grad(sum(terms), list(inputs.values()))
        want = torch.autograd.grad(sum(ref_terms), [refs[n] for n in inputs], allow_unused=True)
        for (n, t), g, e in zip(inputs.items(), got, want):
            e = torch.zeros_like(refs[n]) if e is None else e
            assert g.shape == t.shape, f"grad of {n}: shape {tuple(g.shape)} != {tuple(t.shape)}"
            assert g.dtype == t.dtype, f"grad of {n}: dtype {g.dtype} != {t.dtype}"
            assert_close(g, e, dtype, grad=True, name=f"grad {n}")
            grads[n] = g
    return out, w, grads
