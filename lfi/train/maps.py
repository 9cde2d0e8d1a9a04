"""Teacher vs student interaction maps for a batch of images (for plots and `lfi maps`).

``lfi maps`` is ``checkpoint_maps_png``: a checkpoint's maps on image files or on validation images
of the built-in task, next to its teacher's (built as in training, ``checkpoint_teacher``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from lfi.train.config import VAL_SEED_OFFSET

__all__ = ["collect_maps", "render_maps", "_column_titles", "synthetic_images", "image_files",
           "checkpoint_maps_png"]


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


# ------------------------------------------------------------------------------------------------
# a checkpoint's maps (`lfi maps`)
# ------------------------------------------------------------------------------------------------
def synthetic_images(ck, indices: Sequence[int]):
    """Validation images ``indices`` of a checkpoint's built-in task (its config's task, style,
    distractors and validation data seed) -> (normalised images, ground-truth masks), on ck.device."""
    from lfi.data.synthetic import SyntheticShapes

    cfg, idx = ck.cfg, list(indices)
    ds = SyntheticShapes(max(idx) + 1, img_size=ck.student.img_size[0], concepts=ck.concepts, task=cfg.synthetic_task,
                         num_distractors=cfg.synthetic_distractors, style=cfg.synthetic_style,
                         seed=cfg.synthetic_seed + VAL_SEED_OFFSET)
    imgs01, _, masks = ds.tensors()
    imgs01, masks = imgs01[idx], masks[idx].to(ck.device)
    m, s = torch.tensor(ck.mean).view(1, 3, 1, 1), torch.tensor(ck.std).view(1, 3, 1, 1)
    return ((imgs01 - m) / s).to(ck.device), masks


def image_files(ck, files: Sequence) -> torch.Tensor:
    """Image files (any size: resized and centre-cropped to the student's, then normalised as in
    evaluation) -> (B, 3, H, W) on ck.device."""
    from PIL import Image

    from lfi.data.folders import build_transform

    tf = build_transform(ck.student.img_size[0], ck.mean, ck.std, train=False)
    batch = []
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except (OSError, SyntaxError) as e:  # not an image, truncated, corrupt (UnidentifiedImageError is OSError)
            raise ValueError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
        batch.append(tf(img))
    return torch.stack(batch).to(ck.device)


def checkpoint_maps_png(ck, out, *, images: Sequence = (), synthetic: Optional[Sequence[int]] = None,
                        teacher: bool = True, teacher_weights: Optional[str] = None) -> Path:
    """PNG of a checkpoint's query maps per supervised layer, under its teacher's maps -> the path.

    images: image files; synthetic: indices of validation images of the built-in task (with its
    ground-truth teacher maps; the default, images 0-2, for a run on the built-in task given no
    files). teacher=False: the student's maps only. A CLIP teacher needs weights: ``teacher_weights``
    or the checkpoint's (``teacher_random`` runs excepted).
    """
    from lfi.train.evaluation import checkpoint_loss, checkpoint_teacher
    from lfi.train.visualize import denormalize

    cfg = ck.cfg
    masks, tm = None, None
    if synthetic is not None or (not images and cfg.data == "synthetic"):
        x, masks = synthetic_images(ck, synthetic or [0, 1, 2])
        if teacher:
            tm = checkpoint_teacher(cfg, ck.student, ck.concepts, ck.mean, ck.std, ck.device, synthetic_data=True)
    else:
        if not images:
            raise ValueError("give image files (or --synthetic INDEX for a checkpoint trained on the synthetic task)")
        x = image_files(ck, images)
        if teacher and cfg.teacher not in ("none", "synthetic"):
            if (teacher_weights or cfg.teacher_weights) is None and not cfg.teacher_random:
                raise ValueError("the teacher's maps need its weights: pass --teacher-weights (or --no-teacher)")
            tm = checkpoint_teacher(cfg, ck.student, ck.concepts, ck.mean, ck.std, ck.device, synthetic_data=False,
                                    weights=teacher_weights)
    maps = collect_maps(ck.student, x, teacher=tm, masks=masks, loss_fn=checkpoint_loss(cfg))
    pics = [denormalize(x[b], ck.mean, ck.std) for b in range(x.shape[0])]
    title = "predicted: " + ", ".join(ck.classes[p] for p in maps["logits"].argmax(-1).tolist())
    return render_maps(pics, maps, out, title=title)
