"""Evaluation: accuracy, interaction loss and the map-consistency score.

Map consistency (``map@k``): for every (image, query) pair that the loss's assignment matches to a
present concept, the fraction of the k most-attended patches of the student's head-averaged query
map (last supervised layer) that are also among the k highest patches of the teacher's map for
that concept; k = max(1, round(map_topk * Np)). 1 = same top-k patches, chance level is about k/Np.
With the SyntheticTeacher the reference maps are the ground-truth masks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lfi.train.distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate", "topk_overlap"]


def topk_overlap(student: Tensor, teacher: Tensor, k: int) -> Tensor:
    """Per-row |topk(student) & topk(teacher)| / k for (..., Np) maps -> (...)."""
    Np = student.shape[-1]
    k = max(1, min(k, Np))
    s_idx = student.topk(k, dim=-1).indices
    t_idx = teacher.topk(k, dim=-1).indices
    s_hot = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, s_idx, True)
    t_hot = torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, t_idx, True)
    return (s_hot & t_hot).sum(-1).float() / k


@torch.no_grad()
def evaluate(student, loader, device, *, teacher=None, loss_fn=None, normalize=None, map_topk: float = 0.1,
             autocast=None, dist: Optional[DistInfo] = None, max_batches: Optional[int] = None) -> dict:
    """-> {"acc", "n", "kl", "map_score", "map_pairs"} (kl/map_score None without a teacher).

    loader yields (images, labels) or (images, labels, masks); ``normalize`` maps raw batches to
    the student's input (synthetic data), ``autocast`` is a context-manager factory or None.
    """
    was_training = student.training
    student.eval()
    stats = torch.zeros(6, dtype=torch.float64)  # correct, n, kl_sum, kl_batches, overlap_sum, pairs
    use_teacher = teacher is not None and loss_fn is not None
    for bi, batch in enumerate(loader):
        if max_batches is not None and bi >= max_batches:
            break
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        masks = batch[2].to(device) if len(batch) > 2 else None
        if normalize is not None:
            images = normalize(images)
        ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            if use_teacher:
                logits, qm = student(images, return_maps=True, materialize=True)
                tm = teacher(images, masks) if getattr(teacher, "needs_masks", False) else teacher(images)
                kl = loss_fn(qm, tm)
                index, weight = loss_fn.last_assignment
                smap = qm[-1].maps.float().mean(1)  # (B, K, Np)
                tflat = tm.flat(qm.grid).float()
                tsel = tflat.gather(1, index.unsqueeze(-1).expand(-1, -1, tflat.shape[-1]))
                k = max(1, round(map_topk * smap.shape[-1]))
                ov = topk_overlap(smap, tsel, k)
                stats[2] += float(kl) * images.shape[0]
                stats[3] += images.shape[0]
                stats[4] += float((ov * weight).sum())
                stats[5] += float(weight.sum())
            else:
                logits = student(images)
        stats[0] += float((logits.argmax(-1) == labels).sum())
        stats[1] += labels.shape[0]
    if dist is not None:
        stats = all_reduce_sum(stats.to(device), dist).cpu()
    student.train(was_training)
    n = max(stats[1].item(), 1.0)
    out = {"acc": stats[0].item() / n, "n": int(stats[1].item()), "kl": None, "map_score": None, "map_pairs": 0}
    if use_teacher and stats[3] > 0:
        out["kl"] = stats[2].item() / stats[3].item()
        out["map_score"] = stats[4].item() / max(stats[5].item(), 1.0)
        out["map_pairs"] = int(stats[5].item())
    return out
