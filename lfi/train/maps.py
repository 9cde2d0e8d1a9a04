"""Teacher vs student interaction maps for a batch of images (for plots and `lfi maps`)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["collect_maps", "render_maps", "_column_titles"]


def _column_titles(labels) -> list:
    """Per query column, the first concept name assigned to it over the images ('-' if none)."""
    K = len(labels[0]) if labels else 0
    return [next((row[j] for row in labels if row[j] != "-"), "-") for j in range(K)]


@torch.no_grad()
def collect_maps(student, images, *, teacher=None, masks=None, loss_fn=None) -> dict:
    """-> dict(student (B, L, K, gh, gw) head-mean maps, teacher (B, K, gh, gw) maps assigned to the
    queries or None, labels [[concept name per query] per image], layers [block ids], logits).
    """
    was = student.training
    student.eval()
    logits, qm = student(images, return_maps=True, materialize=True)
    gh, gw = qm.grid
    smaps = torch.stack([lm.maps.float().mean(1) for lm in qm], 1)  # (B, L, K, Np)
    B, L, K, _ = smaps.shape
    out = dict(student=smaps.view(B, L, K, gh, gw).cpu(), teacher=None, layers=qm.layer_ids, logits=logits.cpu(),
               labels=[[f"query {j}" for j in range(K)] for _ in range(B)])
    if teacher is not None:
        tm = teacher(images, masks) if getattr(teacher, "needs_masks", False) else teacher(images)
        if loss_fn is None:
            from lfi.nn.interaction_loss import InteractionLoss

            loss_fn = InteractionLoss()
        loss_fn(qm, tm)
        index, weight = loss_fn.last_assignment
        tflat = tm.flat(qm.grid).float()
        tsel = tflat.gather(1, index.unsqueeze(-1).expand(-1, -1, tflat.shape[-1]))
        tsel = tsel * weight.unsqueeze(-1)  # unassigned / absent concepts are shown blank
        out["teacher"] = tsel.view(B, K, gh, gw).cpu()
        names = tm.concepts or [f"concept {c}" for c in range(tflat.shape[1])]
        out["labels"] = [[(names[int(index[b, j])] if weight[b, j] > 0 else "-") for j in range(K)] for b in range(B)]
    student.train(was)
    return out


def render_maps(images_01, maps: dict, path, *, title: Optional[str] = None, max_layers: Optional[int] = None):
    """PNG: per image a 'teacher' row and one row per supervised layer of the student."""
    from lfi.train.visualize import plot_maps

    rows, imgs = [], []
    B = maps["student"].shape[0]
    layers = list(range(len(maps["layers"])))
    if max_layers is not None and len(layers) > max_layers:
        idx = torch.linspace(0, len(layers) - 1, max_layers).round().long().tolist()
        layers = sorted(set(idx))
    for b in range(B):
        imgs.append(images_01[b])
        r = []
        if maps["teacher"] is not None:
            r.append(("teacher", maps["teacher"][b].numpy()))
        for li in layers:
            r.append((f"student L{maps['layers'][li]}", maps["student"][b, li].numpy()))
        rows.append(r)
    col_titles = _column_titles(maps["labels"])
    return plot_maps(imgs, rows, path, col_titles=col_titles, title=title)
