"""The competing attention implementations and whether each can run here.

They all share the call signature ``fn(q, k, v, need_weights)`` and return ``out`` or
``(out, weights)`` with weights of shape (B, H, M, N):

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

``lfi.ops`` is imported lazily, so that the baselines still run when the op (or one of its
backends) is broken.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["Impl", "IMPLS", "get_impl", "cuda_ext_needs_build", "eager", "sdpa", "flex", "lfi_torch",
           "lfi_triton", "lfi_cuda", "lfi_auto"]


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


def _fused_kwargs(name: str, q, k, need_weights: bool) -> dict:
    """Keyword arguments of a fused attention function (SDPA, flex) for q, k: enable_gqa when the
    heads are grouped. These functions cannot return the weights: NotImplementedError naming it."""
    if need_weights:
        raise NotImplementedError(f"{name} cannot return attention weights")
    return {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}


def sdpa(q, k, v, need_weights=False):
    kwargs = _fused_kwargs("scaled_dot_product_attention", q, k, need_weights)
    if _sdpa_uses_flash(q):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


_FLEX_COMPILED = None


def _flex_fn():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo.config as dcfg
        from torch.nn.attention.flex_attention import flex_attention
        # one compile per shape; the suite has more shapes than dynamo's default recompile limit
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 64))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def flex(q, k, v, need_weights=False):
    return _flex_fn()(q, k, v, **_fused_kwargs("flex_attention", q, k, need_weights))


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
