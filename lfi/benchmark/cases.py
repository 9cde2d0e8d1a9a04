"""A benchmark case: one implementation's inputs on one shape, and a zero-argument step function."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lfi.benchmark.env import device_name, dtype_name
from lfi.benchmark.impls import Impl, get_impl
from lfi.benchmark.measure import measure_peak_memory
from lfi.benchmark.shapes import Shape

__all__ = ["MODES", "Case", "make_case"]

MODES = ("fwd", "fwd+bwd")


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
