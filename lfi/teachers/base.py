"""What a teacher returns: per-concept spatial distributions over the student's patch grid."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TeacherMaps", "resize_log_maps"]


def resize_log_maps(log_maps: Tensor, grid: Sequence[int]) -> Tensor:
    """Bilinear resize of (B, K, h, w) log-maps (or logits) to (B, K, *grid).

    Interpolating logits or log-probabilities gives the same softmax (they differ by a per-row
    constant, which bilinear interpolation preserves)."""
    if tuple(log_maps.shape[-2:]) == tuple(grid):
        return log_maps
    return F.interpolate(log_maps.float(), size=tuple(grid), mode="bilinear", align_corners=False).to(log_maps.dtype)


@dataclass
class TeacherMaps:
    """Teacher interaction maps.

    probs: (B, Kt, h, w) — per concept, a distribution over the h x w patch grid (sums to 1).
    valid: (B, Kt) bool or None — concepts that are present / usable for that image (None = all).
    scores: (B, Kt) or None — image-level relevance of each concept (for top-k assignment).
    concepts: the Kt concept names.
    """

    probs: Tensor
    valid: Optional[Tensor] = None
    scores: Optional[Tensor] = None
    concepts: Optional[list] = None

    def __post_init__(self):
        if not isinstance(self.probs, Tensor) or self.probs.dim() != 4:
            raise ValueError(f"TeacherMaps.probs must be (B, Kt, h, w), got {getattr(self.probs, 'shape', None)}")

    @property
    def grid(self) -> tuple:
        return tuple(self.probs.shape[-2:])

    @property
    def num_concepts(self) -> int:
        return self.probs.shape[1]

    def flat(self, grid: Optional[Sequence[int]] = None) -> Tensor:
        """(B, Kt, Np) probabilities on `grid` (default: the teacher's own grid)."""
        p = self.probs
        if grid is not None and tuple(grid) != self.grid:
            logp = torch.log(p.float().clamp_min(1e-12))
            p = torch.softmax(resize_log_maps(logp, grid).flatten(2), -1).to(self.probs.dtype)
            return p
        return p.flatten(2)

    def at(self, grid: Sequence[int]) -> "TeacherMaps":
        """The same maps resized to `grid` (bilinear in log space, renormalised)."""
        if tuple(grid) == self.grid:
            return self
        return replace(self, probs=self.flat(grid).unflatten(-1, tuple(grid)))

    def to(self, *args, **kwargs) -> "TeacherMaps":
        mv = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        valid = None if self.valid is None else self.valid.to(device=mv(self.probs).device)
        return replace(self, probs=mv(self.probs), valid=valid, scores=mv(self.scores))
