"""Benchmark shapes: the ViT self-attention and cross-attention sets, and ``B,H,M,N,D`` parsing."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Shape", "SHAPES_FULL", "SHAPES_CPU", "shapes_for", "parse_shape"]


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


# N = 1 + (img / 16)^2: 197 (224 px), 577 (384 px), 1025 (512 px), 4097 (1024 px). Both sets are data
# tables, one Shape per row: rows alike by design (not code to fold into a function).
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
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"shape {text!r}: expected integers B,H,M,N,D (or B,H,N,D), e.g. 2,6,197,197,64") from None
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
