"""Built-in synthetic task with known object masks (a stand-in for real data + a VLM teacher).

Each image shows several shapes of *distinct* concepts (circle, square, triangle, cross, ring,
diamond) on a noisy background; by default (``colour_coded=True``) every concept also has its own
hue family (jittered hue, random saturation and brightness). One concept is designated (``target``,
concepts[0] by default) and the **class is the quadrant** (top-left, top-right, bottom-left,
bottom-right) **in which the designated concept lies**; the distractors are placed anywhere. To
classify, a model must find which object is the designated concept and where it is: where the
network attends matters. (With ``colour_coded=False`` only the form tells the concepts apart; the
demo's tiny from-scratch ViT did not get above chance on that variant within the CPU budget, with
or without interaction supervision — measured, see docs/METHOD.md.)

Every image comes with its per-concept pixel masks (``masks``: (C, H, W) float in {0, 1}), which
``lfi.teachers.SyntheticTeacher`` turns into teacher maps. These masks are ground truth, not the
output of a vision-language model: the synthetic task measures the *mechanism* (does supervising
the student's interaction maps speed up learning?) on a CPU, not CLIP's map quality.

Images are generated once, deterministically from ``seed``, and kept in memory as uint8.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticShapes", "SHAPES", "QUADRANTS", "STYLES", "draw_shape"]

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
# Domains for multi-domain evaluation: background level range, noise std, colour saturation.
STYLES = {
    "clean": dict(bg=(0.35, 0.65), noise=0.04, sat=(0.6, 1.0)),
    "noisy": dict(bg=(0.3, 0.7), noise=0.14, sat=(0.6, 1.0)),
    "pale": dict(bg=(0.45, 0.75), noise=0.06, sat=(0.25, 0.5)),
}


def draw_shape(name: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape centred at (cx, cy) with radius r (pixels)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    d2 = dx * dx + dy * dy
    if name == "circle":
        return d2 <= r * r
    if name == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if name == "triangle":
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    if name == "cross":
        t = 0.32 * r
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    if name == "ring":
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.05 * r
    raise ValueError(f"unknown shape {name!r}; known: {SHAPES}")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


class SyntheticShapes(Dataset):
    """The built-in synthetic task (see module docstring).

    Args:
        num_images: dataset size.
        img_size: square image side in pixels (32 in the demo).
        concepts: the shape concepts used (subset of SHAPES); all of them are teacher concepts.
        target: the designated concept whose quadrant is the label (default concepts[0]).
        num_distractors: other concepts drawn per image (distinct, chosen at random).
        radius: (min, max) shape radius in pixels.
        style: a key of STYLES (the "domain").
        seed: generation seed (train and validation sets must use different seeds).

    Items: (image float (3, H, W) in [0, 1], label int, masks float (C, H, W)) with C = len(concepts).
    """

    def __init__(self, num_images: int = 1000, img_size: int = 32, concepts: Sequence[str] = SHAPES,
                 target: Optional[str] = None, num_distractors: int = 4, radius=(3.5, 5.0), style: str = "clean",
                 colour_coded: bool = True, seed: int = 0):
        concepts = list(concepts)
        for c in concepts:
            if c not in SHAPES:
                raise ValueError(f"unknown concept {c!r}; known shapes: {SHAPES}")
        if len(set(concepts)) != len(concepts):
            raise ValueError(f"concepts must be distinct, got {concepts}")
        target = concepts[0] if target is None else target
        if target not in concepts:
            raise ValueError(f"target {target!r} is not one of the concepts {concepts}")
        if not 0 <= num_distractors <= len(concepts) - 1:
            raise ValueError(f"num_distractors must be in 0..{len(concepts) - 1}")
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; known: {list(STYLES)}")
        self.num_images, self.img_size, self.concepts, self.target = num_images, img_size, concepts, target
        self.num_distractors, self.radius, self.style, self.seed = num_distractors, tuple(radius), style, seed
        self.colour_coded = bool(colour_coded)
        self.classes = list(QUADRANTS)
        self.images, self.labels, self.masks = self._generate()

    def _generate(self):
        n, S, C = self.num_images, self.img_size, len(self.concepts)
        rng = np.random.default_rng(self.seed)
        st = STYLES[self.style]
        images = np.empty((n, 3, S, S), dtype=np.uint8)
        masks = np.zeros((n, C, S, S), dtype=bool)
        labels = rng.integers(0, 4, size=n)
        t_idx = self.concepts.index(self.target)
        others = [i for i in range(C) if i != t_idx]
        half, margin = S / 2.0, 1.5
        rmin, rmax = self.radius
        for i in range(n):
            bg = rng.uniform(*st["bg"])
            img = np.full((S, S, 3), bg, dtype=np.float32) + rng.normal(0, 0.03, size=(1, 1, 3)).astype(np.float32)
            # the designated concept: centre inside its label's quadrant, away from the midlines
            qy, qx = divmod(int(labels[i]), 2)
            r = rng.uniform(rmin, rmax)
            lo_x, hi_x = (r + 0.5, half - margin) if qx == 0 else (half + margin, S - r - 0.5)
            lo_y, hi_y = (r + 0.5, half - margin) if qy == 0 else (half + margin, S - r - 0.5)
            placed = [(rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y), r, t_idx)]
            for c in rng.permutation(others)[: self.num_distractors]:
                for _ in range(200):
                    r = rng.uniform(rmin, rmax)
                    cx, cy = rng.uniform(r + 0.5, S - r - 0.5, size=2)
                    if all((cx - px) ** 2 + (cy - py) ** 2 >= (r + pr + 1.0) ** 2 for px, py, pr, _ in placed):
                        placed.append((cx, cy, r, int(c)))
                        break
            for cx, cy, r, c in placed:
                m = draw_shape(self.concepts[c], cx, cy, r, S)
                if self.colour_coded:  # each concept has its own hue family (jittered)
                    hue = (c / C + rng.uniform(-0.04, 0.04)) % 1.0
                    colour = _hsv_to_rgb(hue, rng.uniform(*st["sat"]), rng.uniform(0.55, 1.0))
                else:  # random colour: only the form tells the concept
                    colour = _hsv_to_rgb(rng.uniform(), rng.uniform(*st["sat"]), rng.uniform(0.75, 1.0))
                    if rng.uniform() < 0.5:  # dark or bright objects, so brightness does not give them away
                        colour = colour * rng.uniform(0.15, 0.45)
                img[m] = colour
                masks[i, c] |= m
            img += rng.normal(0, st["noise"], size=img.shape).astype(np.float32)
            images[i] = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(2, 0, 1)
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(masks)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i):
        return self.images[i].float() / 255.0, int(self.labels[i]), self.masks[i].float()

    def tensors(self):
        """(images float (N, 3, H, W) in [0, 1], labels (N,), masks float (N, C, H, W)) — whole set."""
        return self.images.float() / 255.0, self.labels, self.masks.float()

    def save_imagefolder(self, root, limit: Optional[int] = None) -> None:
        """Writes the images as PNGs in an ImageFolder layout root/<quadrant>/<i>.png (for CLI tests)."""
        from pathlib import Path

        from PIL import Image

        root = Path(root)
        for c in self.classes:
            (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(len(self) if limit is None else min(limit, len(self))):
            arr = self.images[i].permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(root / self.classes[int(self.labels[i])] / f"{i:05d}.png")
