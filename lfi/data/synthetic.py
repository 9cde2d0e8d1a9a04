"""Built-in synthetic tasks with known object masks (a stand-in for real data + a VLM teacher).

Each image shows several objects of *distinct* concepts on a background. One concept is designated
(``target``, concepts[0] by default). Two label rules (``task``):

* ``"colour"`` (default; the benchmark of ``lfi demo``): the concepts are surface patterns
  (PATTERNS: stripes, bands, checks, dots, solid, diagonals; fine 2-3 px patterns on objects of a
  random form), every object gets a colour drawn from a palette of four hues (red, yellow, green,
  blue; jittered, random saturation and brightness), and **the class is the palette colour of the
  designated concept** ("stripes" by default). Only the fine pattern tells the concepts apart, so a
  model must find which object is the designated one and read its colour; the other objects carry
  colours of the same palette, so colour statistics of the whole image are only weak evidence. The
  concepts' *locations* (all that the teacher's maps carry) are independent of the label: the maps
  alone do not give it (the leak check of ``lfi demo`` measures this).
* ``"quadrant"`` (the first demo's task, kept to show the leak): every concept has its own hue
  family and the class is the quadrant in which the designated concept lies; a map of that concept
  alone gives the label.

Domains (``style``): "clean" (training), "noisy" (3.5x pixel noise), "pale" (low saturation),
"textured" (striped backgrounds of random orientation and period, darker or brighter): changes the
class does not depend on, for shifted-domain evaluation.

Every image comes with its per-concept pixel masks (``masks``: (C, H, W) float in {0, 1}), which
``lfi.teachers.SyntheticTeacher`` turns into imperfect, VLM-like teacher maps. The masks are ground
truth; the teacher adds the blur, confusions and misses of a real one.

Images are generated once, deterministically from ``seed``, and kept in memory as uint8.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticShapes", "SHAPES", "PATTERNS", "QUADRANTS", "COLOURS", "TASKS", "STYLES", "draw_shape"]

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
PATTERNS = ("stripes", "bands", "checks", "dots", "solid", "diagonals")  # the colour task's concepts
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
COLOURS = {"red": 0.0, "yellow": 0.15, "green": 0.33, "blue": 0.62}  # palette hues of the colour task
TASKS = ("colour", "quadrant")
# Domains: background level range, noise std, colour saturation, striped background (stripe contrast).
STYLES = {
    "clean": dict(bg=(0.35, 0.65), noise=0.04, sat=(0.6, 1.0), stripes=0.0),
    "noisy": dict(bg=(0.3, 0.7), noise=0.14, sat=(0.6, 1.0), stripes=0.0),
    "pale": dict(bg=(0.45, 0.75), noise=0.06, sat=(0.25, 0.5), stripes=0.0),
    "textured": dict(bg=(0.15, 0.85), noise=0.04, sat=(0.6, 1.0), stripes=0.25),
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


def _pattern(name: str, size: int, rng) -> np.ndarray:
    """(size, size) float {0, 1} surface pattern of a concept of the colour task (random phase)."""
    yy, xx = np.mgrid[0:size, 0:size] + rng.integers(0, 6, size=2)[:, None, None]
    if name == "stripes":
        return (xx % 2).astype(np.float32)
    if name == "bands":
        return (yy % 2).astype(np.float32)
    if name == "checks":
        return ((xx + yy) % 2).astype(np.float32)
    if name == "dots":
        return ((xx % 3 == 0) & (yy % 3 == 0)).astype(np.float32)
    if name == "solid":
        return np.zeros((size, size), dtype=np.float32)
    if name == "diagonals":
        return ((xx + yy) % 3 == 0).astype(np.float32)
    raise ValueError(f"unknown pattern {name!r}; known: {PATTERNS}")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


class SyntheticShapes(Dataset):
    """A built-in synthetic task (see module docstring).

    Args:
        num_images: dataset size.
        img_size: square image side in pixels (32 in the demo).
        concepts: the concepts used (default all of PATTERNS for the colour task, SHAPES for the
            quadrant task); all of them are teacher concepts.
        target: the designated concept whose colour (task "colour") or quadrant ("quadrant") is the
            label (default concepts[0]).
        task: "colour" or "quadrant" (see module docstring).
        num_distractors: other concepts drawn per image (distinct, chosen at random).
        radius: (min, max) shape radius in pixels (default img_size / 8 to img_size / 5.8).
        style: a key of STYLES (the "domain").
        seed: generation seed (train and validation sets must use different seeds).

    Items: (image float (3, H, W) in [0, 1], label int, masks float (C, H, W)) with C = len(concepts).
    """

    def __init__(self, num_images: int = 1000, img_size: int = 32, concepts: Optional[Sequence[str]] = None,
                 target: Optional[str] = None, task: str = "colour", num_distractors: int = 3,
                 radius=None, style: str = "clean", seed: int = 0):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        known = PATTERNS if task == "colour" else SHAPES
        concepts = list(known if concepts is None else concepts)
        for c in concepts:
            if c not in known:
                raise ValueError(f"unknown concept {c!r} for task {task!r}; known: {known}")
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
        radius = (img_size / 8.0, img_size / 5.8) if radius is None else tuple(radius)
        self.task, self.num_distractors, self.radius, self.style, self.seed = task, num_distractors, radius, style, seed
        self.classes = list(COLOURS) if task == "colour" else list(QUADRANTS)
        self.images, self.labels, self.masks = self._generate()

    def _background(self, rng, st) -> np.ndarray:
        S = self.img_size
        bg = rng.uniform(*st["bg"])
        img = np.full((S, S, 3), bg, dtype=np.float32) + rng.normal(0, 0.03, size=(1, 1, 3)).astype(np.float32)
        if st["stripes"] > 0:  # stripes of random orientation and period (3-8 px), a random tint
            yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
            angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 8.0)
            wave = np.sign(np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period))
            tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
            img += (st["stripes"] * wave)[..., None] * tint
        return img

    def _place(self, rng, label: int, t_idx: int, others) -> list:
        """[(cx, cy, r, concept index)]: the designated concept first, then non-overlapping distractors."""
        S, (rmin, rmax) = self.img_size, self.radius
        r = rng.uniform(rmin, rmax)
        if self.task == "quadrant":  # centre inside the label's quadrant, away from the midlines
            half, margin = S / 2.0, 1.5
            qy, qx = divmod(label, 2)
            lo_x, hi_x = (r + 0.5, half - margin) if qx == 0 else (half + margin, S - r - 0.5)
            lo_y, hi_y = (r + 0.5, half - margin) if qy == 0 else (half + margin, S - r - 0.5)
            placed = [(rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y), r, t_idx)]
        else:
            cx, cy = rng.uniform(r + 0.5, S - r - 0.5, size=2)
            placed = [(cx, cy, r, t_idx)]
        for c in rng.permutation(others)[: self.num_distractors]:
            for _ in range(200):
                r = rng.uniform(rmin, rmax)
                cx, cy = rng.uniform(r + 0.5, S - r - 0.5, size=2)
                if all((cx - px) ** 2 + (cy - py) ** 2 >= (r + pr + 1.0) ** 2 for px, py, pr, _ in placed):
                    placed.append((cx, cy, r, int(c)))
                    break
        return placed

    def _generate(self):
        n, S, C = self.num_images, self.img_size, len(self.concepts)
        rng = np.random.default_rng(self.seed)
        st = STYLES[self.style]
        images = np.empty((n, 3, S, S), dtype=np.uint8)
        masks = np.zeros((n, C, S, S), dtype=bool)
        labels = rng.integers(0, len(self.classes), size=n)
        t_idx = self.concepts.index(self.target)
        others = [i for i in range(C) if i != t_idx]
        hues = list(COLOURS.values())
        for i in range(n):
            img = self._background(rng, st)
            for j, (cx, cy, r, c) in enumerate(self._place(rng, int(labels[i]), t_idx, others)):
                if self.task == "colour":  # any form; the concept is the surface pattern
                    m = draw_shape(SHAPES[int(rng.integers(len(SHAPES)))], cx, cy, r, S)
                    # the designated concept's colour is the label, the others' colours are random
                    hue = hues[int(labels[i]) if j == 0 else int(rng.integers(len(hues)))] + rng.uniform(-0.03, 0.03)
                else:  # quadrant task: the concept is the form, and each concept has its own hue family
                    m = draw_shape(self.concepts[c], cx, cy, r, S)
                    hue = c / C + rng.uniform(-0.04, 0.04)
                colour = _hsv_to_rgb(hue % 1.0, rng.uniform(*st["sat"]), rng.uniform(0.55, 1.0))
                if self.task == "colour":
                    img[m] = colour * (1.0 - 0.6 * _pattern(self.concepts[c], S, rng)[m])[:, None]
                else:
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
