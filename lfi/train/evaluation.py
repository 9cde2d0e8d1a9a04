"""Evaluation: accuracy, interaction loss and the map-consistency score.

Map consistency (``map@k``): for every (image, query) pair that the loss's assignment matches to a
present concept, the fraction of the k most-attended patches of the student's head-averaged query
map (last supervised layer) that are also among the k highest patches of the teacher's map for
that concept; k = max(1, round(map_topk * Np)). 1 = same top-k patches, chance level is about k/Np.
With the SyntheticTeacher the reference maps are the ground-truth masks.

``lfi eval`` is ``evaluate_checkpoint`` (a checkpoint over one or more domains); the teacher that
scores its maps is built by the trainer's own ``build_teacher`` (``checkpoint_teacher``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from lfi.train.config import SHIFT_SEED_OFFSET, TrainConfig
from lfi.train.distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate", "topk_overlap", "LoadedCheckpoint", "load_for_eval", "checkpoint_loss", "checkpoint_teacher",
           "EvalDomain", "eval_domains", "evaluate_checkpoint"]


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
    """-> {"acc", "n", "kl", "map_score", "map_pairs", "skipped_images"} (kl/map_score None without a
    teacher; skipped_images: unreadable files of a load_imagefolder dataset, each named in a warning and
    replaced by the next readable image, so that the score is over n images of which that many are repeats).

    loader yields (images, labels) or (images, labels, masks); ``normalize`` maps raw batches to
    the student's input (synthetic data), ``autocast`` is a context-manager factory or None.
    """
    from lfi.data.folders import reset_skipped, skipped_images

    was_training = student.training
    student.eval()
    reset_skipped(loader.dataset)
    stats = torch.zeros(7, dtype=torch.float64)  # correct, n, kl_sum, kl_batches, overlap_sum, pairs, skipped
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
    stats[6] = skipped_images(loader.dataset)
    if dist is not None:
        stats = all_reduce_sum(stats.to(device), dist).cpu()
    student.train(was_training)
    n = max(stats[1].item(), 1.0)
    out = {"acc": stats[0].item() / n, "n": int(stats[1].item()), "kl": None, "map_score": None, "map_pairs": 0,
           "skipped_images": int(stats[6].item())}
    if use_teacher and stats[3] > 0:
        out["kl"] = stats[2].item() / stats[3].item()
        out["map_score"] = stats[4].item() / max(stats[5].item(), 1.0)
        out["map_pairs"] = int(stats[5].item())
    return out


# ------------------------------------------------------------------------------------------------
# a checkpoint over domains (`lfi eval`)
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    """A checkpoint's student (on ``device``, eval mode), its metadata and its training config."""

    student: Any
    meta: dict
    cfg: TrainConfig
    device: torch.device

    @property
    def classes(self) -> list:
        return self.meta["classes"]

    @property
    def concepts(self) -> list:
        return self.meta["concepts"]

    @property
    def mean(self) -> tuple:
        return tuple(self.meta["mean"])

    @property
    def std(self) -> tuple:
        return tuple(self.meta["std"])


def load_for_eval(path, device: str = "auto") -> LoadedCheckpoint:
    """Rebuilds a checkpoint's student on ``device`` ("auto": CUDA when available) with its config."""
    from lfi.train.checkpoint import load_student
    from lfi.train.trainer import _resolve_device

    dev = _resolve_device(device)
    student, meta = load_student(path)
    student.to(dev)
    return LoadedCheckpoint(student, meta, TrainConfig.from_dict(meta.get("config", {})), dev)


def checkpoint_loss(cfg: TrainConfig):
    """The InteractionLoss of a training config (its query-to-concept assignment, head mode and KL
    temperature; "auto", which training resolves before saving, falls back to topk)."""
    from lfi.nn.interaction_loss import InteractionLoss

    return InteractionLoss(assignment=cfg.assignment if cfg.assignment != "auto" else "topk", heads=cfg.heads,
                           temperature=cfg.kl_temperature)


def checkpoint_teacher(cfg: TrainConfig, student, concepts, mean, std, device, *, synthetic_data: bool,
                       weights: Optional[str] = None):
    """The teacher whose maps a checkpoint's maps are scored against, built exactly as in training
    (``lfi.train.trainer.build_teacher``: same class, templates, temperature, concept selection).

    synthetic_data: the built-in task's SyntheticTeacher (ground-truth masks, with the config's blur,
    score noise and confusions), whatever teacher the run trained with. Otherwise the config's CLIP
    teacher with ``weights`` (default: the config's ``teacher_weights``), or None when the run had
    no CLIP teacher (teacher "none" / "synthetic").
    """
    from lfi.train.trainer import build_teacher

    if synthetic_data:
        return build_teacher(cfg.replace(teacher="synthetic"), student, concepts, mean, std, device, synthetic=True)
    if cfg.teacher in ("none", "synthetic"):
        return None
    return build_teacher(cfg.replace(teacher_weights=weights or cfg.teacher_weights), student, concepts, mean, std,
                         device, synthetic=False)


class EvalDomain(NamedTuple):
    name: str
    loader: Any
    normalize: Optional[Callable[[Tensor], Tensor]]  # raw batch -> student input (synthetic data), or None
    teacher: Any                                     # None: accuracy only


def eval_domains(ck: LoadedCheckpoint, data: str, *, batch_size: int = 64, workers: int = 2, maps: bool = True,
                 teacher_weights: Optional[str] = None) -> list:
    """The domains ``lfi eval`` scores a checkpoint on -> [EvalDomain].

    data: an ImageFolder (one domain), a folder of domain ImageFolders (root/<domain>/<class>/<img>),
    or "synthetic": the built-in task in every style of lfi.data.synthetic.STYLES, on the shifted
    test sets' data seed (``SHIFT_SEED_OFFSET``). maps=False: no teacher (accuracy only). A CLIP
    teacher needs weights: ``teacher_weights`` or the checkpoint's (``teacher_random`` runs excepted).
    """
    from torch.utils.data import DataLoader

    cfg, student, device = ck.cfg, ck.student, ck.device
    img_size = student.img_size[0]
    domains = []
    if data == "synthetic":
        from lfi.data.synthetic import STYLES, SyntheticShapes

        teacher = None
        if maps:
            teacher = checkpoint_teacher(cfg, student, ck.concepts, ck.mean, ck.std, device, synthetic_data=True)
        m = torch.tensor(ck.mean, device=device).view(1, 3, 1, 1)
        s = torch.tensor(ck.std, device=device).view(1, 3, 1, 1)
        for style in STYLES:
            ds = SyntheticShapes(cfg.synthetic_val, img_size=img_size, concepts=ck.concepts, style=style,
                                 task=cfg.synthetic_task, num_distractors=cfg.synthetic_distractors,
                                 seed=cfg.synthetic_seed + SHIFT_SEED_OFFSET)
            domains.append(EvalDomain(f"synthetic-{style}", DataLoader(ds, batch_size=batch_size),
                                      lambda x: (x - m) / s, teacher))
        return domains
    from lfi.data.folders import build_transform, find_domains, load_imagefolder

    teacher = None
    if maps and cfg.teacher not in ("none", "synthetic"):
        if (teacher_weights or cfg.teacher_weights) is None and not cfg.teacher_random:
            raise ValueError("the map score needs the CLIP teacher's weights: pass --teacher-weights (or --no-maps)")
        teacher = checkpoint_teacher(cfg, student, ck.concepts, ck.mean, ck.std, device, synthetic_data=False,
                                     weights=teacher_weights)
    tf = build_transform(img_size, ck.mean, ck.std, train=False)
    for name, path in find_domains(data):
        ds = load_imagefolder(path, tf, classes=ck.classes)
        domains.append(EvalDomain(name, DataLoader(ds, batch_size=batch_size, num_workers=workers), None, teacher))
    return domains


def evaluate_checkpoint(ck: LoadedCheckpoint, data: str, *, batch_size: int = 64, workers: int = 2,
                        maps: bool = True, teacher_weights: Optional[str] = None, map_topk: float = 0.1) -> dict:
    """Accuracy and map consistency of a checkpoint per domain (``eval_domains``) -> {"domains":
    {name: evaluate(...)}, "mean_acc", "mean_map_score"} (the means over domains; the map score's
    over the domains that have one, None if none)."""
    loss_fn = checkpoint_loss(ck.cfg)
    results: dict = {"domains": {}}
    for d in eval_domains(ck, data, batch_size=batch_size, workers=workers, maps=maps,
                          teacher_weights=teacher_weights):
        results["domains"][d.name] = evaluate(ck.student, d.loader, ck.device, teacher=d.teacher, loss_fn=loss_fn,
                                              normalize=d.normalize, map_topk=map_topk)
    accs = [r["acc"] for r in results["domains"].values()]
    maps_ = [r["map_score"] for r in results["domains"].values() if r["map_score"] is not None]
    results["mean_acc"] = sum(accs) / len(accs)
    results["mean_map_score"] = sum(maps_) / len(maps_) if maps_ else None
    return results
