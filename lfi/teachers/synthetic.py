"""SyntheticTeacher: VLM-like interaction maps from the synthetic task's object masks.

**A stand-in for a vision-language teacher, for the built-in synthetic tasks only.** It turns the
ground-truth per-concept masks that come with each synthetic image into spatial distributions over
the student's patch grid, and makes them as imperfect as a real VLM's:

1. blur: patch coverage of each mask (area average pooling to the grid) -> Gaussian smoothing
   (``sigma`` in patches) -> + ``floor`` * max -> normalised to sum 1;
2. its own presence scores: score_c = 1[c present] + N(0, ``score_noise``); a concept is *valid*
   (supervises the image) when its score > 0.5 — so it misses present concepts and hallucinates
   absent ones (each with probability Phi(-0.5 / score_noise): 7.7 % at the default 0.35);
3. confusions: a valid concept's map is, with probability ``confuse`` (and always when the concept
   is absent but scored present), replaced by the map of another object in the image (a concept
   the teacher mistook for it); invalid concepts get the uniform map (no loss on them).

Its random choices are a deterministic function of the image's masks and ``seed`` (a real teacher
gives the same answer for the same image in every epoch). ``sigma=0.5, score_noise=0, confuse=0``
is the oracle of the first demo (maps = blurred ground truth). Use ``lfi.teachers.CLIPTeacher`` on
real data.
"""
from __future__ import annotations

import zlib
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
    """VLM-like teacher maps from ground-truth masks (see module docstring; synthetic tasks only).

    Args:
        concepts: the concept names, in the order of the masks' channels.
        grid: the student's patch grid (rows, cols).
        sigma: Gaussian smoothing of the coverage maps, in patches.
        floor: fraction of each map's maximum added everywhere before normalising (0 = none).
        score_noise: std of the noise on the teacher's presence scores (0 = it knows what is present).
        confuse: probability that a valid concept's map is another object's map.
        seed: seed of the teacher's errors.

    ``teacher(images, masks)`` -> TeacherMaps(probs (B, C, *grid), valid (B, C), scores (B, C)).
    """

    needs_masks = True

    def __init__(self, concepts: Sequence[str], grid: Sequence[int], sigma: float = 1.0, floor: float = 0.0,
                 score_noise: float = 0.35, confuse: float = 0.15, seed: int = 0):
        super().__init__()
        if not 0.0 <= confuse <= 1.0:
            raise ValueError(f"confuse must be a probability in [0, 1], got {confuse}")
        if not score_noise >= 0.0:
            raise ValueError(f"score_noise must be >= 0, got {score_noise}")
        self.concepts = list(concepts)
        self.grid = tuple(int(g) for g in grid)
        self.sigma, self.floor = float(sigma), float(floor)
        self.score_noise, self.confuse, self.seed = float(score_noise), float(confuse), int(seed)

    def _generator(self, cov: Tensor) -> torch.Generator:
        """A generator seeded from one image's (C, gh, gw) coverage: the same image, the same errors."""
        key = torch.round(cov * 255).to(torch.uint8).cpu().numpy().tobytes()
        return torch.Generator().manual_seed(zlib.crc32(key) ^ (self.seed * 0x9E3779B1 & 0xFFFFFFFF))

    @torch.no_grad()
    def forward(self, images: Optional[Tensor], masks: Tensor) -> TeacherMaps:
        if masks is None:
            raise ValueError("SyntheticTeacher needs the ground-truth masks of the batch (synthetic dataset only)")
        if masks.shape[1] != len(self.concepts):
            raise ValueError(f"masks have {masks.shape[1]} channels but the teacher has {len(self.concepts)} concepts")
        with torch.autocast(masks.device.type, enabled=False):
            probs, present, _ = masks_to_maps(masks.float(), self.grid, self.sigma, self.floor)
            if self.score_noise == 0 and self.confuse == 0:
                return TeacherMaps(probs=probs, valid=present, scores=present.float(), concepts=self.concepts)
            cov = F.adaptive_avg_pool2d(masks.float(), self.grid).cpu()
            B, C = present.shape
            noise, u_conf, pick = torch.empty(B, C), torch.empty(B, C), torch.empty(B, C)
            for b in range(B):
                g = self._generator(cov[b])
                noise[b] = torch.randn(C, generator=g)
                u_conf[b] = torch.rand(C, generator=g)
                pick[b] = torch.rand(C, generator=g)
            dev = probs.device
            scores = present.float() + self.score_noise * noise.to(dev)
            valid = scores > 0.5
            # confused: hallucinated concepts, and a `confuse` fraction of the valid ones
            confused = valid & (~present | (u_conf.to(dev) < self.confuse))
            # the object it is confused with: a random present concept other than itself
            others = present[:, None, :] & ~torch.eye(C, dtype=torch.bool, device=dev)  # (B, C, C)
            n_others = others.sum(-1)
            rank = (pick.to(dev) * n_others).long().clamp_max((n_others - 1).clamp_min(0))  # which of the others
            src = (others.cumsum(-1) == (rank + 1)[..., None]) & others
            src_idx = src.float().argmax(-1)  # (B, C)
            confused = confused & (n_others > 0)
            swapped = probs.gather(1, src_idx[..., None, None].expand_as(probs))
            out = torch.where(confused[..., None, None], swapped, probs)
            uniform = torch.full_like(out, 1.0 / (out.shape[-1] * out.shape[-2]))
            valid = valid & (present | confused)  # an absent concept with no object to confuse it with: no map
            out = torch.where(valid[..., None, None], out, uniform)
        return TeacherMaps(probs=out, valid=valid, scores=scores, concepts=self.concepts)

    def extra_repr(self) -> str:
        return (f"concepts={self.concepts}, grid={self.grid}, sigma={self.sigma}, score_noise={self.score_noise}, "
                f"confuse={self.confuse}")
