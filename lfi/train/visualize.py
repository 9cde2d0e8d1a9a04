"""Plots (matplotlib, Agg backend): accuracy curves and teacher-vs-student interaction maps."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["plot_curves", "plot_maps", "denormalize"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path, dpi: int) -> Path:
    """Writes `fig` to `path` atomically (the format from its suffix, PNG without one), creating the
    folder, and closes it; returns the path."""
    from lfi.train.checkpoint import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format=path.suffix[1:] or "png"))
    plt.close(fig)
    return path


def denormalize(image, mean, std) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float array in [0, 1]."""
    import torch

    x = image.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_curves(curves: dict, path, *, target: Optional[float] = None, title: str = "validation accuracy") -> Path:
    """curves: {label: [[acc per epoch] per seed]} -> PNG with the per-epoch mean and min-max band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in curves.items():
        n = min(len(r) for r in runs)
        a = np.array([r[:n] for r in runs], dtype=float) * 100
        ep = np.arange(1, n + 1)
        line, = ax.plot(ep, a.mean(0), marker="o", ms=3, label=f"{label} (mean of {len(runs)})")
        if len(runs) > 1:
            ax.fill_between(ep, a.min(0), a.max(0), color=line.get_color(), alpha=0.2)
    if target is not None:
        ax.axhline(100 * target, color="gray", ls="--", lw=1, label=f"target {100 * target:.0f}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path, dpi=120)


def plot_maps(images: Sequence, rows: Sequence[tuple], path, *, col_titles: Optional[Sequence[str]] = None,
              title: Optional[str] = None) -> Path:
    """A grid per image: column 0 the image, then one column per query/concept; one row per map set.

    images: list of (H, W, 3) arrays. rows: per image, a list of (row label, maps (K, gh, gw) array
    or None). Maps are drawn with bilinear upsampling over the image.
    """
    plt = _plt()
    n_img = len(images)
    n_rows = sum(len(r) for r in rows)
    K = max((m.shape[0] for r in rows for _, m in r if m is not None), default=1)
    fig, axes = plt.subplots(n_rows, K + 1, figsize=(1.6 * (K + 1), 1.6 * n_rows), squeeze=False)
    r0 = 0
    for i in range(n_img):
        img = images[i]
        for j, (label, maps) in enumerate(rows[i]):
            ax = axes[r0 + j, 0]
            ax.imshow(img)
            ax.set_ylabel(label, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            for k in range(K):
                ax = axes[r0 + j, k + 1]
                ax.set_xticks([])
                ax.set_yticks([])
                if maps is None or k >= maps.shape[0]:
                    ax.axis("off")
                    continue
                H, W = img.shape[:2]
                ax.imshow(img, alpha=0.35)
                ax.imshow(maps[k], cmap="magma", alpha=0.75, extent=(0, W, H, 0), interpolation="bilinear")
                if r0 + j == 0 and col_titles is not None and k < len(col_titles):
                    ax.set_title(col_titles[k], fontsize=7)
        r0 += len(rows[i])
    if title:
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / max(n_rows, 1)))
    else:
        fig.tight_layout()
    return _save(plt, fig, path, dpi=110)
