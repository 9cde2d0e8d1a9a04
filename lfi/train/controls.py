"""Controls for LFI experiments: the same teacher signal, used without interaction queries.

* ``MapHead`` — output-level map supervision: a linear layer on the student's final patch tokens
  predicts one logit per (concept, patch); KL(teacher map || softmax over patches) with the same
  valid concepts and weight as the interaction loss. Same targets, no attention involved.
* ``MapClassifier`` / ``leak_check`` — the best simple classifier (multinomial logistic regression
  and a one-hidden-layer MLP) trained on the teacher's output alone (all concept maps + presence
  scores) to predict the label. Its validation accuracy next to chance says how much of the label
  the teacher hands over; the fitted classifier is also the teacher of the logit-distillation
  control (``distill_loss``), so that a gain of LFI over distillation cannot come from label
  information in the teacher.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfi.ops import attention_kl

__all__ = ["MapHead", "MapClassifier", "teacher_features", "fit_map_classifier", "leak_check", "distill_loss"]


class MapHead(nn.Module):
    """Linear (C -> Kt) on patch tokens (B, Np, C) -> per-concept logits over patches (B, Kt, Np)."""

    def __init__(self, dim: int, num_concepts: int):
        super().__init__()
        self.proj = nn.Linear(dim, num_concepts)

    def forward(self, patch_tokens: Tensor) -> Tensor:
        return self.proj(patch_tokens).transpose(1, 2)

    def loss(self, patch_tokens: Tensor, teacher) -> Tensor:
        """Mean over (image, valid concept) pairs of KL(t || softmax(logits)) in nats."""
        logits = self(patch_tokens).float()  # (B, Kt, Np)
        target = teacher.flat().to(logits.device, torch.float32)
        if target.shape != logits.shape:
            raise ValueError(f"teacher maps {tuple(target.shape)} do not match the map head's {tuple(logits.shape)}")
        kl = attention_kl(logits[:, None], target[:, None], reduction="none")[:, 0]  # (B, Kt)
        valid = torch.ones_like(kl, dtype=torch.bool) if teacher.valid is None else teacher.valid.to(kl.device)
        w = valid.float()
        return (kl * w).sum() / w.sum().clamp_min(1.0)


def _features(teacher_maps) -> Tensor:
    """(B, Kt * Np + Kt) float32: every concept map and the teacher's presence scores."""
    probs = teacher_maps.flat().float().flatten(1)
    scores = teacher_maps.scores
    if scores is None:
        scores = torch.ones(probs.shape[0], teacher_maps.num_concepts, device=probs.device)
    return torch.cat([probs, scores.float().to(probs.device)], 1)


@torch.no_grad()
def teacher_features(teacher, loader, normalize=None, device="cpu") -> tuple:
    """Runs the teacher over a loader of (images, labels[, masks]) -> (features (N, F), labels (N,))."""
    xs, ys = [], []
    for batch in loader:
        images, labels = batch[0].to(device), batch[1]
        masks = batch[2].to(device) if len(batch) > 2 else None
        if normalize is not None:
            images = normalize(images)
        tm = teacher(images, masks) if getattr(teacher, "needs_masks", False) else teacher(images)
        xs.append(_features(tm).cpu())
        ys.append(labels.cpu())
    return torch.cat(xs), torch.cat(ys)


class MapClassifier(nn.Module):
    """A classifier on the teacher's output: standardised features -> linear ("logistic") or
    Linear-GELU-Linear ("mlp", 128 hidden). ``forward(teacher_maps)`` -> logits (B, classes)."""

    def __init__(self, num_features: int, num_classes: int, kind: str = "logistic", mean=None, std=None):
        super().__init__()
        if kind not in ("logistic", "mlp"):
            raise ValueError(f"kind must be 'logistic' or 'mlp', got {kind!r}")
        self.kind = kind
        self.register_buffer("mean", torch.zeros(num_features) if mean is None else mean.clone())
        self.register_buffer("std", torch.ones(num_features) if std is None else std.clone())
        if kind == "logistic":
            self.net = nn.Linear(num_features, num_classes)
        else:
            self.net = nn.Sequential(nn.Linear(num_features, 128), nn.GELU(), nn.Linear(128, num_classes))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)

    def forward(self, teacher_maps) -> Tensor:
        x = _features(teacher_maps)
        return self.forward_features(x.to(self.mean.device))


def fit_map_classifier(x: Tensor, y: Tensor, num_classes: int, kind: str = "logistic", *, steps: int = 400,
                       weight_decay: float = 1e-3, seed: int = 0) -> MapClassifier:
    """Full-batch AdamW on (x, y); deterministic for a seed. Returns the classifier in eval mode, frozen."""
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g)))
        clf = MapClassifier(x.shape[1], num_classes, kind, mean, std)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-2, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(clf.forward_features(x), y).backward()
            opt.step()
    clf.eval().requires_grad_(False)
    return clf


def leak_check(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, num_classes: int,
               seed: int = 0) -> dict:
    """Validation accuracy of classifiers trained on the teacher's output alone.

    -> dict(chance (majority class of the validation set), logistic, mlp, best (the larger),
    classifier (the best MapClassifier))."""
    out: dict = {}
    best: Optional[MapClassifier] = None
    for kind in ("logistic", "mlp"):
        clf = fit_map_classifier(x_train, y_train, num_classes, kind, seed=seed)
        with torch.no_grad():
            acc = (clf.forward_features(x_val).argmax(-1) == y_val).float().mean().item()
        out[kind] = acc
        if best is None or acc > out[best.kind]:
            best = clf
    out["chance"] = torch.bincount(y_val, minlength=num_classes).max().item() / max(1, len(y_val))
    out["best"] = out[best.kind]
    out["classifier"] = best
    return out


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """Hinton distillation: T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean."""
    t = float(temperature)
    log_p = F.log_softmax(student_logits.float() / t, -1)
    log_q = F.log_softmax(teacher_logits.float() / t, -1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t
