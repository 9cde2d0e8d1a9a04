"""SyntheticTeacher: interaction maps from known object masks.

**A stand-in for a vision-language teacher, for the built-in synthetic task only.** It does not
look at the image: it turns the ground-truth per-concept masks that come with each synthetic image
into spatial distributions over the student's patch grid, i.e. what an ideal CLIP teacher's
text-to-patch maps would be. Use ``lfi.teachers.CLIPTeacher`` on real data.

Recipe per concept c: coverage of each patch by the mask (area average pooling to the grid) ->
Gaussian smoothing on the grid (``sigma`` in patches) -> + ``floor`` * max -> normalised to sum 1.
A concept absent from the image (empty mask) is marked invalid (no loss on it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfi.teachers.base import TeacherMaps

__all__ = ["SyntheticTeacher", "masks_to_maps"]


def _gaussian_kernel(sigma: float, device, dtype) -> Tensor:
    radius = max(1, int(round(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def masks_to_maps(masks: Tensor, grid: Sequence[int], sigma: float = 0.5, floor: float = 0.0):
    """(B, C, H, W) masks -> ((B, C, gh, gw) probabilities, (B, C) valid, (B, C) area)."""
    if masks.dim() != 4:
        raise ValueError(f"masks must be (B, C, H, W), got {tuple(masks.shape)}")
    m = masks.float()
    cov = F.adaptive_avg_pool2d(m, tuple(grid))
    area = m.flatten(2).mean(-1)
    if sigma > 0:
        B, C, gh, gw = cov.shape
        k = _gaussian_kernel(sigma, cov.device, cov.dtype)
        r = k.numel() // 2
        x = cov.reshape(B * C, 1, gh, gw)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate" if gw > r else "constant"), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate" if gh > r else "constant"), k.view(1, 1, -1, 1))
        cov = x.reshape(B, C, gh, gw)
    if floor > 0:
        cov = cov + floor * cov.flatten(2).amax(-1)[..., None, None]
    total = cov.flatten(2).sum(-1)
    valid = area > 0
    probs = cov / total.clamp_min(1e-12)[..., None, None]
    uniform = torch.full_like(probs, 1.0 / (probs.shape[-1] * probs.shape[-2]))
    probs = torch.where(valid[..., None, None], probs, uniform)
    return probs, valid, area


class SyntheticTeacher(nn.Module):
    """Teacher maps from ground-truth masks (see module docstring; synthetic task only).

    Args:
        concepts: the concept names, in the order of the masks' channels.
        grid: the student's patch grid (rows, cols).
        sigma: Gaussian smoothing of the coverage maps, in patches.
        floor: fraction of each map's maximum added everywhere before normalising (0 = none).

    ``teacher(images, masks)`` -> TeacherMaps(probs (B, C, *grid), valid (B, C), scores = mask area).
    """

    needs_masks = True

    def __init__(self, concepts: Sequence[str], grid: Sequence[int], sigma: float = 0.5, floor: float = 0.0):
        super().__init__()
        self.concepts = list(concepts)
        self.grid = tuple(int(g) for g in grid)
        self.sigma, self.floor = float(sigma), float(floor)

    @torch.no_grad()
    def forward(self, images: Optional[Tensor], masks: Tensor) -> TeacherMaps:
        if masks is None:
            raise ValueError("SyntheticTeacher needs the ground-truth masks of the batch (synthetic dataset only)")
        if masks.shape[1] != len(self.concepts):
            raise ValueError(f"masks have {masks.shape[1]} channels but the teacher has {len(self.concepts)} concepts")
        with torch.autocast(masks.device.type, enabled=False):
            probs, valid, area = masks_to_maps(masks.float(), self.grid, self.sigma, self.floor)
        return TeacherMaps(probs=probs, valid=valid, scores=area, concepts=self.concepts)

    def extra_repr(self) -> str:
        return f"concepts={self.concepts}, grid={self.grid}, sigma={self.sigma}"
