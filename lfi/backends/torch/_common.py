"""Helpers shared by the reference ops: compute dtype, row chunking, grouped heads, row lse."""
from __future__ import annotations

import os

import torch

from lfi._numerics import compute_dtype  # noqa: F401  (the reference ops import it from here)


def env_positive_int(name: str, default: int, what: str) -> int:
    """The environment variable `name` as an int >= 1 (`default` when unset or empty); a ValueError
    naming the variable and the expected value otherwise."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {name} must be a positive integer ({what}), got {raw!r}")
    return value


def chunk_rows(B: int, H: int, M: int, N: int, itemsize: int) -> int:
    budget = env_positive_int("LFI_TORCH_CHUNK_BYTES", 64 << 20, "bytes of temporaries per chunk, default 67108864")
    # A chunk holds about three (B, H, rows, N) temporaries (scores, probabilities, gradients).
    return max(1, min(M, budget // max(1, 3 * B * H * N * itemsize)))


def grouped(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H, R, X) -> (B, Hkv, G, R, X), a view."""
    return t.unflatten(1, (hkv, t.shape[1] // hkv))


def row_stats(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row max m, log l) with l = sum exp(s - m), both (..., 1); (0, +inf) for rows with no
    unmasked key (why a pair: lfi._numerics)."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    log_l = torch.log(torch.exp(s - m).sum(-1, keepdim=True))
    return m, torch.where(log_l == float("-inf"), torch.full_like(log_l, float("inf")), log_l)


def rows_of(t, r0: int, r1: int):
    """Rows r0:r1 of a 4-D tensor that may broadcast along dim 2 (size 1 there is kept)."""
    return None if t is None else (t[:, :, r0:r1] if t.shape[2] != 1 else t)
