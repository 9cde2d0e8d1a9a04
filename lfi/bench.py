"""Benchmark helpers shared by ``lfi bench`` and the pytest-benchmark suite in ``benchmarks/``.

Everything here is plain PyTorch; ``lfi.ops`` is imported lazily so that the baselines still run
when the op (or one of its backends) is broken.

Competing implementations all share the call signature ``fn(q, k, v, need_weights)`` and return
``out`` or ``(out, weights)`` with weights of shape (B, H, M, N):

==============  ===========  =============================================================
name            maps         what it is
==============  ===========  =============================================================
``eager``       yes          ``softmax((q * scale) @ k^T) @ v`` in q's dtype (the only way to get
                             maps without lfi: materializes the full (B, H, M, N) scores)
``sdpa``        no           ``F.scaled_dot_product_attention``; on CUDA with fp16/bf16 the flash
                             backend is forced (label ``sdpa_flash``)
``flex``        no           ``torch.compile(flex_attention)`` (CUDA only)
``lfi_torch``   yes          ``interaction_attention(..., backend="torch")``
``lfi_triton``  yes          ``interaction_attention(..., backend="triton")`` (CUDA only; the
                             Triton interpreter is never timed)
``lfi_cuda``    yes          ``interaction_attention(..., backend="cuda")``: the C++/CUDA extension
                             lfi_C (CUDA kernels, and CPU kernels for CPU tensors); its first use
                             may JIT-compile it
``lfi_auto``    yes          ``interaction_attention(..., backend="auto")``: what a patched model
                             runs. Without maps the call is routed to SDPA
                             (``lfi._dispatch.routes_to_sdpa``); with maps it runs the backend auto
                             picks (or the one LFI_BACKEND names)
==============  ===========  =============================================================
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = [
    "Impl",
    "IMPLS",
    "Shape",
    "SHAPES_FULL",
    "SHAPES_CPU",
    "Case",
    "MODES",
    "default_device",
    "default_dtype",
    "device_name",
    "get_impl",
    "make_case",
    "measure_peak_memory",
    "parse_dtype",
    "shapes_for",
    "synchronize",
    "time_ms",
    "versions",
]

MODES = ("fwd", "fwd+bwd")


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (what training uses), fp32 on CPU (CPU bf16 matmuls are not representative)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16, fp64") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.float64: "fp64"}.get(dtype, str(dtype).replace("torch.", ""))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        major, minor = torch.cuda.get_device_capability(idx)
        return f"{name} (sm_{major}{minor})"
    if device.type == "cpu":
        return f"{cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"
    return str(device)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version
        out["lfi"] = version("lfi")
    except Exception:
        try:
            import lfi
            out["lfi"] = getattr(lfi, "__version__", "unknown")
        except Exception:
            out["lfi"] = "not importable"
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "not installed"
    out["cuda (torch build)"] = torch.version.cuda or "none"
    return out


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------
def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    return k, v


def eager(q, k, v, need_weights=False):
    """Materialized attention in q's dtype, the way timm's non-fused path does it."""
    k, v = _repeat_kv(q, k, v)
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    out = attn @ v
    return (out, attn) if need_weights else out


def _sdpa_uses_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def sdpa(q, k, v, need_weights=False):
    if need_weights:
        raise NotImplementedError("scaled_dot_product_attention cannot return attention weights")
    kwargs = {}
    if q.shape[1] != k.shape[1]:
        kwargs["enable_gqa"] = True
    if _sdpa_uses_flash(q):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


_FLEX_COMPILED = None


def _flex_fn():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo.config as dcfg
        # one compile per shape; the suite has more shapes than dynamo's default recompile limit
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 64))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def flex(q, k, v, need_weights=False):
    if need_weights:
        raise NotImplementedError("flex_attention cannot return attention weights")
    kwargs = {}
    if q.shape[1] != k.shape[1]:
        kwargs["enable_gqa"] = True
    return _flex_fn()(q, k, v, **kwargs)


def lfi_torch(q, k, v, need_weights=False):
    from lfi.ops import interaction_attention
    return interaction_attention(q, k, v, need_weights=need_weights, backend="torch")


def lfi_triton(q, k, v, need_weights=False):
    from lfi.ops import interaction_attention
    return interaction_attention(q, k, v, need_weights=need_weights, backend="triton")


def lfi_cuda(q, k, v, need_weights=False):
    from lfi.ops import interaction_attention
    return interaction_attention(q, k, v, need_weights=need_weights, backend="cuda")


def lfi_auto(q, k, v, need_weights=False):
    from lfi.ops import interaction_attention
    return interaction_attention(q, k, v, need_weights=need_weights, backend="auto")


def cuda_ext_needs_build() -> str | None:
    """Why the first backend="cuda" call would have to compile the lfi_C extension, or None when
    it is already loaded, built ahead of time, or in the JIT cache (or the state is unknown)."""
    try:
        from lfi.backends.cuda import _ext

        info = _ext.extension_info()
    except Exception:
        return None
    if info.get("built") or info.get("aot_path"):
        return None
    cached = info.get("jit_cache")
    if cached:
        try:  # torch's JIT loader rebuilds when a source changed since the cached build
            csrc = getattr(_ext, "CSRC", None)
            newest = max((p.stat().st_mtime for p in csrc.rglob("*") if p.is_file()), default=0.0)
            if newest <= os.path.getmtime(cached):
                return None
        except Exception:
            return None
        return ("the lfi_C sources changed since the cached JIT build, so its first use recompiles it "
                "(minutes); allow that with `lfi bench --build-ext`")
    return ("the lfi_C extension is not built yet and its first use compiles it (minutes); "
            "build it first (e.g. `lfi bench --build-ext --impls lfi_cuda`)")


def _lfi_backend_ok(backend: str, device: torch.device) -> tuple[bool, str]:
    try:
        import lfi.ops  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the op's state
        return False, f"lfi.ops does not import: {type(e).__name__}: {e}"
    if backend == "auto":
        return True, "lfi, backend auto"
    try:
        from lfi._dispatch import backend_status
    except Exception:
        return True, "lfi._dispatch.backend_status unavailable; trying anyway"
    try:
        status = backend_status(device)
    except Exception as e:
        return True, f"backend_status failed ({type(e).__name__}: {e}); trying anyway"
    usable, reason = status.get(backend, (False, f"backend {backend!r} unknown to lfi._dispatch"))
    return bool(usable), reason


@dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable[..., Any]
    maps: bool  # can return exact attention maps
    cuda_only: bool = False
    lfi_backend: str | None = None
    description: str = ""

    def available(self, device: torch.device | str, dtype: torch.dtype | None = None,
                  allow_build: bool = True) -> tuple[bool, str]:
        """(usable, reason) for timing this implementation on ``device``. ``allow_build=False``
        also rejects lfi_cuda when its first call would compile the extension."""
        device = torch.device(device)
        if self.cuda_only and device.type != "cuda":
            return False, f"{self.name} runs on CUDA only (device is {device.type})"
        if self.name == "flex":
            try:
                from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
            except Exception as e:
                return False, f"flex_attention unavailable: {e}"
        if self.lfi_backend is not None:
            if self.lfi_backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
                return False, "TRITON_INTERPRET=1 is set: the Triton interpreter is not timed"
            ok, reason = _lfi_backend_ok(self.lfi_backend, device)
            if ok and self.lfi_backend == "cuda" and not allow_build:
                why = cuda_ext_needs_build()
                if why is not None:
                    return False, why
            return ok, reason
        return True, ""

    def label(self, device: torch.device | str, dtype: torch.dtype) -> str:
        if self.name == "sdpa" and torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return "sdpa_flash"
        return self.name


IMPLS: dict[str, Impl] = {
    i.name: i
    for i in [
        Impl("eager", eager, maps=True, description="matmul-softmax-matmul, materialized scores"),
        Impl("sdpa", sdpa, maps=False, description="F.scaled_dot_product_attention (flash forced on CUDA fp16/bf16)"),
        Impl("flex", flex, maps=False, cuda_only=True, description="torch.compile(flex_attention)"),
        Impl("lfi_torch", lfi_torch, maps=True, lfi_backend="torch", description="lfi, torch backend (chunked)"),
        Impl("lfi_triton", lfi_triton, maps=True, cuda_only=True, lfi_backend="triton",
             description="lfi, Triton kernels"),
        Impl("lfi_cuda", lfi_cuda, maps=True, lfi_backend="cuda",
             description="lfi, C++/CUDA extension (CPU kernels on CPU)"),
        Impl("lfi_auto", lfi_auto, maps=True, lfi_backend="auto",
             description="lfi, backend auto (no maps: routed to SDPA)"),
    ]
}


def get_impl(name: str) -> Impl:
    try:
        return IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}") from None


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    M: int
    N: int
    D: int = 64
    Hkv: int | None = None  # None: same as H
    kind: str = "self"      # "self" (ViT self-attention, M == N) or "cross" (M queries over N patches)

    @property
    def hkv(self) -> int:
        return self.H if self.Hkv is None else self.Hkv

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.B, self.H, self.M, self.N, self.D)

    def __str__(self) -> str:
        gqa = f", Hkv={self.Hkv}" if self.Hkv not in (None, self.H) else ""
        return f"B={self.B}, H={self.H}{gqa}, M={self.M}, N={self.N}, D={self.D}"

    def map_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one (B, H, M, N) score / probability tensor."""
        return self.B * self.H * self.M * self.N * torch.empty((), dtype=dtype).element_size()


# N = 1 + (img / 16)^2: 197 (224 px), 577 (384 px), 1025 (512 px), 4097 (1024 px).
SHAPES_FULL: list[Shape] = [
    Shape("vit_s_n197", 64, 6, 197, 197),
    Shape("vit_b_n197", 64, 12, 197, 197),
    Shape("vit_b_n577", 32, 12, 577, 577),
    Shape("vit_b_n1025", 32, 12, 1025, 1025),
    Shape("vit_s_n4097", 32, 6, 4097, 4097),
    Shape("xattn_m16_n197", 64, 12, 16, 197, kind="cross"),
    Shape("xattn_m64_n577", 32, 12, 64, 577, kind="cross"),
    Shape("xattn_m64_n4097", 32, 12, 64, 4097, kind="cross"),
]

# Reduced for a (slow) CPU: B=2 and fewer heads, but still N=4097 for the memory comparison.
SHAPES_CPU: list[Shape] = [
    Shape("vit_s_n197", 2, 6, 197, 197),
    Shape("vit_s_n577", 2, 6, 577, 577),
    Shape("vit_s_n1025", 2, 6, 1025, 1025),
    Shape("vit_n4097", 2, 4, 4097, 4097),
    Shape("xattn_m16_n197", 2, 6, 16, 197, kind="cross"),
    Shape("xattn_m64_n4097", 2, 6, 64, 4097, kind="cross"),
]


def shapes_for(device: torch.device | str, which: str = "auto") -> list[Shape]:
    """``which``: "auto" (full on CUDA, reduced on CPU), "full" or "cpu"."""
    if which == "auto":
        which = "full" if torch.device(device).type == "cuda" else "cpu"
    if which == "full":
        return list(SHAPES_FULL)
    if which == "cpu":
        return list(SHAPES_CPU)
    raise ValueError(f"unknown shape set {which!r}; use auto, full or cpu")


def parse_shape(text: str) -> Shape:
    """``"B,H,M,N,D"`` (or ``"B,H,N,D"`` for self-attention) -> Shape."""
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 4:
        b, h, n, d = parts
        m = n
    elif len(parts) == 5:
        b, h, m, n, d = parts
    else:
        raise ValueError(f"shape {text!r}: expected B,H,M,N,D (or B,H,N,D)")
    if min(parts) < 1:
        raise ValueError(f"shape {text!r}: all sizes must be >= 1")
    return Shape("custom", b, h, m, n, d, kind="self" if m == n else "cross")


# --------------------------------------------------------------------------------------------
# Memory and timing
# --------------------------------------------------------------------------------------------
_LIBC = None


def _malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so RSS peaks are not hidden by reuse."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except Exception:
            _LIBC = False
    if _LIBC:
        try:
            _LIBC.malloc_trim(0)
        except Exception:
            pass


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_supported() -> bool:
    return _proc_status_kb("VmHWM") is not None and _reset_rss_peak()


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, int | None]:
    """Run ``fn()`` once; return (its result, peak extra bytes during the call).

    CUDA: ``max_memory_allocated`` minus what was allocated before (the inputs), i.e. the extra
    memory the call needed at its peak. CPU: process peak RSS (``VmHWM`` after resetting it by
    writing "5" to /proc/self/clear_refs) minus the RSS before the call; ``None`` when the kernel
    does not support that. The CPU number is coarser (page granularity, includes allocator slack).
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - base)
    if device.type == "cpu":
        _malloc_trim()
        if not _reset_rss_peak():
            return fn(), None
        before = _proc_status_kb("VmRSS")
        result = fn()
        peak = _proc_status_kb("VmHWM")
        if before is None or peak is None:
            return result, None
        return result, max(0, peak - before) * 1024
    return fn(), None


def time_ms(fn: Callable[[], Any], device: torch.device | str, min_run_time: float = 0.3) -> dict[str, float]:
    """Median / IQR in milliseconds using ``torch.utils.benchmark.Timer`` (synchronizes CUDA)."""
    from torch.utils.benchmark import Timer

    device = torch.device(device)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3, "runs": float(len(m.times))}


def time_once_s(fn: Callable[[], Any], device: torch.device | str) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# A benchmark case: inputs + a zero-argument step function
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    impl: Impl
    shape: Shape
    device: torch.device
    dtype: torch.dtype
    mode: str            # "fwd" or "fwd+bwd"
    maps: bool           # need_weights
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grads: tuple = field(default_factory=tuple)  # (g_out,) or (g_out, g_weights) for fwd+bwd

    def step(self) -> Any:
        """One forward (+ backward) call. fwd returns the op's result; fwd+bwd returns the grads."""
        if self.mode == "fwd":
            return self.impl.fn(self.q, self.k, self.v, self.maps)
        for t in (self.q, self.k, self.v):
            t.grad = None
        res = self.impl.fn(self.q, self.k, self.v, self.maps)
        outs = tuple(res) if self.maps else (res,)
        torch.autograd.backward(outs, self.grads)
        return (self.q.grad, self.k.grad, self.v.grad)

    def measure_peak(self) -> tuple[Any, int | None]:
        """One step under ``measure_peak_memory``, with earlier .grad tensors freed first so that
        the gradients this call allocates count towards its peak."""
        for t in (self.q, self.k, self.v):
            t.grad = None
        return measure_peak_memory(self.step, self.device)

    def release(self) -> None:
        for t in (self.q, self.k, self.v):
            t.grad = None
        self.q = self.k = self.v = None  # type: ignore[assignment]
        self.grads = ()

    def info(self) -> dict[str, Any]:
        s = self.shape
        return {
            "impl": self.impl.name,
            "label": self.impl.label(self.device, self.dtype),
            "shape": s.name,
            "B": s.B, "H": s.H, "Hkv": s.hkv, "M": s.M, "N": s.N, "D": s.D,
            "kind": s.kind,
            "mode": self.mode,
            "maps": self.maps,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "device_name": device_name(self.device),
            "torch_threads": torch.get_num_threads(),
            "map_mib": s.map_bytes(self.dtype) / 2**20,
        }


def make_case(impl: Impl | str, shape: Shape, device: torch.device | str, dtype: torch.dtype,
              mode: str, maps: bool, seed: int = 0) -> Case:
    impl = get_impl(impl) if isinstance(impl, str) else impl
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if maps and not impl.maps:
        raise ValueError(f"{impl.name} cannot return attention maps")
    device = torch.device(device)
    # generated on the device itself: the map-sized gradients of the big CUDA shapes are GBs
    g = torch.Generator(device=device).manual_seed(seed)
    bwd = mode == "fwd+bwd"

    def rand(*size):
        return torch.randn(*size, generator=g, device=device, dtype=dtype)

    s = shape
    q = rand(s.B, s.H, s.M, s.D).requires_grad_(bwd)
    k = rand(s.B, s.hkv, s.N, s.D).requires_grad_(bwd)
    v = rand(s.B, s.hkv, s.N, s.D).requires_grad_(bwd)
    grads: tuple = ()
    if bwd:
        grads = (rand(s.B, s.H, s.M, s.D),)
        if maps:
            # a dense gradient into the maps, as a KL / MSE loss on them would produce
            grads = grads + (rand(s.B, s.H, s.M, s.N) * (1.0 / s.N),)
    return Case(impl, shape, device, dtype, mode, maps, q, k, v, grads)


def max_abs_diff(a: Any, b: Any) -> float:
    """Max |a - b| over matching tensors in (possibly nested) tuples, computed in fp32."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return float("inf")


def is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch.cuda, "OutOfMemoryError", None), MemoryError) if t)
    return isinstance(e, oom_types) or "out of memory" in str(e).lower()


def free_memory(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `lfi bench` or `pytest benchmarks/ --benchmark-only`")
