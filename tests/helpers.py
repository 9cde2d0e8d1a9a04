"""Helpers shared by the test modules (imported after conftest.py set TRITON_INTERPRET).

The backend matrix: every correctness, gradient, numerics and error case of the shared suite is
parametrized over ALL_BACKENDS (``backend_params()`` / ``backend_param()`` / the ``backend`` fixture of
conftest.py). A backend that cannot run here stays in the matrix as a skipped case whose reason says
why (BACKEND_SKIP); BACKENDS lists the usable ones by name.

The other shared (non-test) modules: reference.py (the float64 references), kl_cases.py (data and
checks of the KL suites), integration_models.py (tiny timm / open_clip models). Test modules import
these, never each other.
"""
from __future__ import annotations

import importlib.util
import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

ALL_BACKENDS = ["torch", "triton", "cuda"]


def _triton_problem() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    # On CPU the Triton backend needs the interpreter (conftest.py sets it when there is no GPU).
    if not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        return "no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run"
    return None


def _cuda_ext_problem() -> str | None:
    """Why backend="cuda" (the C++/CUDA extension lfi_C, lfi/backends/cuda/_ext.py) cannot run on
    DEVICE, or None. Never builds anything: on CPU the extension counts as available when it is loaded,
    has an ahead-of-time build, or can be JIT-built here (compiler, ninja and csrc/ present; the build
    itself happens, cached, on the first call with backend="cuda"). On a GPU it must also carry the
    CUDA kernels (nvcc at build time)."""
    from lfi.backends.cuda import _ext

    if DEVICE.type == "cpu":
        if _ext.is_loaded() or _ext.PROBE["aot"] is not None or _ext.PROBE["build_problem"] is None:
            return None
        return f"cannot build the lfi_C extension here: {_ext.PROBE['build_problem']}"
    reason = _ext.unusable_reason(DEVICE)
    return None if reason is None else f"backend='cuda' cannot run on {DEVICE}: {reason}"


BACKEND_SKIP = {name: reason for name, reason in (("triton", _triton_problem()), ("cuda", _cuda_ext_problem()))
                if reason is not None}
BACKENDS = [b for b in ALL_BACKENDS if b not in BACKEND_SKIP]  # the usable ones


def backend_param(backend, *values, id=None):
    """pytest.param(backend, *values) that is skipped, with the reason, where `backend` cannot run."""
    marks = [pytest.mark.skip(reason=f"backend={backend!r}: {BACKEND_SKIP[backend]}")] if backend in BACKEND_SKIP \
        else []
    return pytest.param(backend, *values, id=id or backend, marks=marks)


def case_params(cases):
    """pytest.param per case dict, with the case's "id"."""
    return [pytest.param(c, id=c["id"]) for c in cases]


def case_id(case) -> str:
    """The id of a case in a param list: a case dict's "id", else str(case)."""
    return case["id"] if isinstance(case, dict) else str(case)


def backend_params(exclude=(), cases=None):
    """The backend axis of the matrix: one (possibly skipped) param per backend of ALL_BACKENDS; with
    `cases`, the product backend x case as (backend, case) params with ids "backend-case"."""
    backends = [b for b in ALL_BACKENDS if b not in exclude]
    if cases is None:
        return [backend_param(b) for b in backends]
    return [backend_param(b, c, id=f"{b}-{case_id(c)}") for b in backends for c in cases]


BACKEND_PARAMS = backend_params()

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
    """float64 runs on the torch backend and on the CPU kernels of the cuda backend (not on its CUDA
    kernels, nor on Triton)."""
    if dtype != torch.float64:
        return True
    return backend == "torch" or (backend == "cuda" and DEVICE.type == "cpu")


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


def run_and_compare(backend, q, k, v, attn_mask=None, *, is_causal=False, scale=None,
                    need_weights=False, average=False, rows=None, loss="both", gen=None,
                    dtype=None, check_grads=True):
    """Runs interaction_attention and the float64 reference on the same inputs and compares the
    output, the maps and (for every input that requires grad) the gradients of a random linear
    loss on `loss` in {"out", "weights", "both", None}. Returns (out, weights, grads dict)."""
    from lfi.ops import interaction_attention  # imported late: conftest.py sets TRITON_INTERPRET first
    from reference import reference_attention
    from reference import select_weights

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


# --------------------------------------------------------------------------------------------------
# The custom ops (torch.ops.lfi.*)
# --------------------------------------------------------------------------------------------------

def schema_args(op, named):
    """Positional args in the op's schema order. Arguments a test does not name (later additions to
    the op, e.g. optional extras) get their default, or None when optional."""
    args = []
    for a in op._schema.arguments:
        if a.name in named:
            args.append(named[a.name])
        elif a.has_default_value():
            args.append(a.default_value)
        elif isinstance(a.type, torch.OptionalType):
            args.append(None)
        else:
            raise AssertionError(f"unknown required argument {a.name!r} in {op._schema}")
    return tuple(args)


# The Triton backend runs under the CPU interpreter (TRITON_INTERPRET=1, no GPU): every tile step
# costs milliseconds there, so the few grids of long rows marked with it skip Triton in the
# interpreter (they run on a GPU, compiled).
INTERPRETED = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1"
# The Triton CPU interpreter evaluates masked-off lanes too (numpy warns on -inf - -inf there); the
# results are checked element by element for NaN / inf, so the warnings are noise. conftest.py
# filters it for the whole suite.
INTERPRETER_NOISE = "ignore:invalid value encountered:RuntimeWarning"


def force_exact_fp32_split(monkeypatch):
    """Makes the Triton attention launcher take the exact-float32 path of sm_90 GPUs (PRECISION
    "3xtf32": operands split into TF32 parts) under the CPU interpreter, which multiplies the TF32
    parts exactly, as tensor cores do."""
    from lfi.backends.triton import interaction_attention as launcher

    monkeypatch.setattr(launcher, "_precision", lambda dtype, split_by_hand=False: "3xtf32")


def record_dkdv_parts(monkeypatch) -> list:
    """The DK_DV constexpr of every dK/dV launch of the Triton attention launcher, appended as the
    launches happen (3: one kernel for dK and dV; 2, then 1: dV and dK in two launches)."""
    from lfi.backends.triton import interaction_attention as launcher

    parts, dkdv = [], launcher._dkdv

    def recording(grid, *args, **constexprs):
        parts.append(constexprs["DK_DV"])
        return dkdv(grid, *args, **constexprs)

    monkeypatch.setattr(launcher, "_dkdv", recording)
    return parts


def as_gpu_nans(*tensors):
    """Rewrites, in place, every NaN of the float32 tensors (None skipped) as 0x7FFFFFFF, the NaN
    NVIDIA GPUs compute (numpy's, and so the interpreter's, is 0x7FC00000)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float32:
            t.view(torch.int32)[t.isnan()] = 0x7FFFFFFF


def backend_dtype_params(dtypes=None, skip_interpreter=None, cases=None):
    """(backend, dtype) params over the matrix where the backend runs the dtype on DEVICE (float64:
    torch, and cuda on CPU), ids "backend-dtype"; with `cases`, the product with them as
    (backend, dtype, case) params, ids "backend-dtype-case". skip_interpreter: a reason to skip the
    Triton params under the CPU interpreter (INTERPRETED)."""
    out = []
    for b in ALL_BACKENDS:
        for d in dtypes or ALL_DTYPES:
            if not backend_supports(b, d):
                continue
            for values, pid in ([((d,), f"{b}-{DTYPE_IDS[d]}")] if cases is None else
                               [((d, c), f"{b}-{DTYPE_IDS[d]}-{case_id(c)}") for c in cases]):
                p = backend_param(b, *values, id=pid)
                if skip_interpreter and b == "triton" and INTERPRETED:
                    p = pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.skip(
                        reason=f"Triton CPU interpreter: {skip_interpreter} (runs compiled on a GPU)")])
                out.append(p)
    return out


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------

# The smallest open_clip CLIP (ViT-S-16 with 2 layers of width 128, 64x64 images): builds in ~0.1 s.
TINY_CLIP = dict(embed_dim=64, vision_cfg=dict(image_size=64, patch_size=16, layers=2, width=128, head_width=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=4, layers=2))
