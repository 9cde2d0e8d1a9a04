"""The LFI trainer: task loss + lam * InteractionLoss, AdamW with warmup + cosine, AMP, DDP, resume.

    loss = CE(student(x), y) + lam * InteractionLoss(query maps of student(x), teacher(x))

The teacher is frozen and runs under no_grad on every step (its maps are never cached, so image
augmentations stay consistent between teacher and student). The baseline is the same run with
lam = 0: the same student architecture, the queries then receive no gradient (they are frozen so
that DDP does not wait for them), nothing else changes. The controls of ``lfi demo`` are options of
the same run: ``supervision="map_head"`` / ``"logits"`` (lfi.train.controls), ``teacher_shuffle``.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lfi.train import checkpoint as ckpt
from lfi.train.config import VAL_SEED_OFFSET, TrainConfig
from lfi.train.controls import distill_loss
from lfi.train.distributed import all_reduce_sum, barrier, cleanup_distributed, init_distributed
from lfi.train.evaluation import evaluate
from lfi.train.interrupt import StopRequest, TrainingInterrupted

__all__ = ["Trainer", "run_training", "build_student", "build_teacher", "build_data", "LFIStep", "seed_everything"]

_SYNTH_CACHE: dict = {}


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False


def _resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def synthetic_datasets(cfg: TrainConfig):
    """(train, val) SyntheticShapes, cached in-process (the demo reuses them across runs)."""
    from lfi.data.synthetic import SyntheticShapes

    concepts = None
    if cfg.synthetic_concepts:
        concepts = tuple(c.strip() for c in cfg.synthetic_concepts.split(",") if c.strip())
    common = dict(img_size=cfg.img_size, concepts=concepts, num_distractors=cfg.synthetic_distractors,
                  task=cfg.synthetic_task)
    out = []
    for n, seed, style in ((cfg.synthetic_train, cfg.synthetic_seed, cfg.synthetic_style),
                           (cfg.synthetic_val, cfg.synthetic_seed + VAL_SEED_OFFSET, cfg.synthetic_style)):
        key = (n, seed, style, tuple(sorted(common.items())))
        if key not in _SYNTH_CACHE:
            _SYNTH_CACHE[key] = SyntheticShapes(n, style=style, seed=seed, **common)
        out.append(_SYNTH_CACHE[key])
    return out[0], out[1]


def build_data(cfg: TrainConfig, mean, std) -> dict:
    """-> dict(train, val, classes, concepts, synthetic)."""
    from lfi.data.folders import build_transform, class_concepts, load_imagefolder, read_concepts

    if cfg.synthetic:
        train, val = synthetic_datasets(cfg)
        concepts = list(train.concepts)
        if cfg.concepts is not None:
            given = read_concepts(cfg.concepts)
            if given != concepts:
                raise ValueError(f"the synthetic task's concepts are {concepts}; --concepts gave {given}")
        return dict(train=train, val=val, classes=list(train.classes), concepts=concepts, synthetic=True)
    train = load_imagefolder(cfg.data, build_transform(cfg.img_size, mean, std, train=True, augment=cfg.augment),
                             strict=cfg.strict)
    classes = list(train.classes)
    val = None
    if cfg.val_data:
        val = load_imagefolder(cfg.val_data, build_transform(cfg.img_size, mean, std, train=False), classes=classes,
                               strict=cfg.strict)
    elif cfg.val_split > 0:
        n = len(train)
        g = torch.Generator().manual_seed(cfg.seed)
        perm = torch.randperm(n, generator=g).tolist()
        n_val = max(1, int(round(cfg.val_split * n)))
        eval_view = load_imagefolder(cfg.data, build_transform(cfg.img_size, mean, std, train=False),
                                     strict=cfg.strict)
        val = torch.utils.data.Subset(eval_view, perm[:n_val])
        train_sub = torch.utils.data.Subset(train, perm[n_val:])
        train_sub.classes = classes
        train = train_sub
    concepts = class_concepts(classes, read_concepts(cfg.concepts))
    return dict(train=train, val=val, classes=classes, concepts=concepts, synthetic=False)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def build_student(cfg: TrainConfig, num_classes: int):
    from lfi.models import InteractionViT

    return InteractionViT(cfg.student, num_queries=cfg.queries, supervised_layers=cfg.supervised_layers,
                          num_classes=num_classes, img_size=cfg.img_size, pretrained=cfg.student_weights or False,
                          read_back=cfg.read_back, head=cfg.head, pos_embed_init=cfg.pos_embed_init,
                          **cfg.student_kwargs)


def student_norm(student) -> tuple:
    pc = getattr(student.vit, "pretrained_cfg", None) or {}
    return tuple(pc.get("mean", (0.5, 0.5, 0.5))), tuple(pc.get("std", (0.5, 0.5, 0.5)))


def synthetic_teacher(cfg: TrainConfig, concepts, grid):
    """The SyntheticTeacher of a config (blur, score noise and confusions from its synthetic_* fields)."""
    from lfi.teachers import SyntheticTeacher

    return SyntheticTeacher(concepts, grid, sigma=cfg.synthetic_sigma, score_noise=cfg.synthetic_score_noise,
                            confuse=cfg.synthetic_confuse)


def build_teacher(cfg: TrainConfig, student, concepts, mean, std, device, synthetic: bool):
    """SyntheticTeacher, CLIPTeacher or None (teacher="none" or lam == 0)."""
    if cfg.teacher == "none":
        return None
    if cfg.teacher == "synthetic":
        if not synthetic:
            raise ValueError("--teacher synthetic needs the built-in synthetic data (--data synthetic): it reads "
                             "ground-truth masks. Use a CLIP teacher (--teacher ViT-B-16 --teacher-weights ...)")
        return synthetic_teacher(cfg, concepts, student.grid).to(device)
    from lfi.teachers.clip import DEFAULT_TEMPLATES, CLIPTeacher

    if cfg.teacher_weights is None and not cfg.teacher_random:
        raise ValueError(f"--teacher {cfg.teacher} needs --teacher-weights /path/to/open_clip_weights (lfi never "
                         "downloads weights); --teacher-random uses random weights (tests only)")
    templates = tuple(t for t in cfg.templates.split("|")) if cfg.templates else DEFAULT_TEMPLATES
    return CLIPTeacher(cfg.teacher, pretrained=cfg.teacher_weights, concepts=concepts, templates=templates,
                       temperature=cfg.teacher_temperature, target_entropy=cfg.teacher_target_entropy,
                       select=cfg.teacher_select, topk=cfg.teacher_topk, threshold=cfg.teacher_threshold,
                       grid=student.grid, input_mean=mean, input_std=std, quick_gelu=cfg.quick_gelu,
                       model_kwargs=cfg.teacher_kwargs, device=device)


SUPERVISION = ("queries", "map_head", "logits")


def shuffled(teacher_maps):
    """The teacher output of another image for every image (the batch rolled by one): the
    shuffled-teacher control keeps the maps' statistics and breaks their relation to the image."""
    roll = lambda t: None if t is None else t.roll(1, 0)  # noqa: E731
    return replace(teacher_maps, probs=roll(teacher_maps.probs), valid=roll(teacher_maps.valid),
                   scores=roll(teacher_maps.scores))


class LFIStep(nn.Module):
    """student + losses in one module, so DDP sees every tensor that needs a gradient.

    supervision: "queries" (LFI: the interaction loss on the query maps), "map_head" (control: the
    same targets on an output-level MapHead) or "logits" (control: distillation of the logits of a
    classifier trained on the teacher's output, ``teacher_classifier``)."""

    def __init__(self, student, loss_fn, lam: float, label_smoothing: float = 0.0, supervision: str = "queries",
                 map_head: Optional[nn.Module] = None, teacher_classifier: Optional[nn.Module] = None,
                 kd_temperature: float = 2.0):
        super().__init__()
        self.student, self.loss_fn, self.lam, self.label_smoothing = student, loss_fn, float(lam), label_smoothing
        self.supervision, self.map_head, self.kd_temperature = supervision, map_head, float(kd_temperature)
        self.teacher_classifier = teacher_classifier

    def forward(self, images, labels, teacher_maps=None):
        kl = torch.zeros((), device=images.device)
        if self.lam > 0 and teacher_maps is not None and self.supervision == "queries":
            logits, qm = self.student(images, return_maps=True)
            kl = self.loss_fn(qm, teacher_maps).float()
        elif self.lam > 0 and teacher_maps is not None and self.supervision == "map_head":
            x, z, _ = self.student.forward_features(images)
            logits = self.student.forward_head(x, z)
            kl = self.map_head.loss(x[:, self.student.num_prefix:], teacher_maps).float()
        else:
            logits = self.student(images)
            if self.lam > 0 and teacher_maps is not None:  # supervision == "logits"
                kl = distill_loss(logits, self.teacher_classifier(teacher_maps), self.kd_temperature)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return ce + self.lam * kl, ce.detach(), kl.detach(), logits.detach()


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name \
                or "reg_token" in name or "interaction." in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warmup to `base` over `warmup` steps, then cosine to `minimum` at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.safetensors", "checkpoint.json")


def existing_run_files(out) -> list:
    """The run files (RUN_FILES) present in a run folder."""
    out = Path(out).expanduser()
    return [name for name in RUN_FILES if (out / name).exists()]


class Trainer:
    """Builds everything from a TrainConfig; ``run()`` trains and returns the history.

    Files in cfg.out (main process): checkpoint.safetensors + checkpoint.json (every save_every
    epochs and at the end), metrics.jsonl (one JSON line per epoch), config.json. An out folder that
    already holds a run (RUN_FILES) is refused unless the run resumes from a checkpoint (cfg.resume) or
    starts over (cfg.overwrite: its run files are removed first), so two runs never mix.

    Ctrl-C (SIGINT) in ``run()`` stops after the optimizer step in flight, writes a resumable
    checkpoint (mid-epoch: the epoch's position and partial sums are in its sidecar) and raises
    TrainingInterrupted; ``resume="auto"`` then continues from that step. With ``workers=0`` the
    continued run is the uninterrupted one exactly; with loader workers, the augmentations of the
    rest of that epoch are drawn anew.
    """

    def __init__(self, cfg: TrainConfig, console=None, on_epoch: Optional[Callable[[dict], None]] = None):
        self.cfg = cfg
        self.on_epoch = on_epoch
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        pre = _resolve_device(cfg.device)
        self.dist = init_distributed(pre.type)
        self.device = _resolve_device(cfg.device, self.dist.local_rank)
        self.main = self.dist.is_main
        self.console = console
        if self.console is None and self.main and not cfg.quiet:
            from rich.console import Console

            self.console = Console()
        seed_everything(cfg.seed, cfg.deterministic)
        self._check_config()

        # student first (its normalisation defines the data pipeline), then data, then the teacher
        self.out = Path(cfg.out)
        if cfg.synthetic:
            num_classes = len(synthetic_datasets(cfg)[0].classes)  # cached: built once, reused by build_data
        else:
            from lfi.data.folders import imagefolder_classes

            num_classes = len(imagefolder_classes(cfg.data))  # folder names only: no image is listed twice
        self.student = build_student(cfg, num_classes)
        self.mean, self.std = student_norm(self.student)
        self.data = build_data(cfg, self.mean, self.std)
        self.classes, self.concepts = self.data["classes"], self.data["concepts"]
        self.student.to(self.device)
        self.lam = cfg.lam if cfg.teacher != "none" else 0.0
        self.teacher = build_teacher(cfg, self.student, self.concepts, self.mean, self.std, self.device,
                                     self.data["synthetic"]) if self.lam > 0 else None
        if cfg.supervision not in SUPERVISION:
            raise ValueError(f"supervision must be one of {SUPERVISION}, got {cfg.supervision!r}")
        # map@k and the validation KL describe supervised queries only (unsupervised queries' maps mean nothing)
        self.eval_teacher = self.teacher if cfg.supervision == "queries" else None
        from lfi.nn.interaction_loss import InteractionLoss

        if cfg.assignment == "auto":  # every concept gets its own query when possible
            cfg = self.cfg = cfg.replace(assignment="fixed" if len(self.concepts) <= cfg.queries else "topk")
        self.loss_fn = InteractionLoss(assignment=cfg.assignment, heads=cfg.heads, temperature=cfg.kl_temperature)
        if self.eval_teacher is not None and cfg.assignment == "fixed" and len(self.concepts) > cfg.queries:
            raise ValueError(f"--assignment fixed pairs query i with concept i but there are {len(self.concepts)} "
                             f"concepts and {cfg.queries} queries: use --queries {len(self.concepts)} or more, or "
                             "--assignment topk / hungarian")
        if (self.lam == 0 or cfg.supervision != "queries") and not self.student.queries_change_prediction():
            self.student.interaction.requires_grad_(False)  # baseline: queries unused, keep DDP happy
        map_head = classifier = None
        if self.teacher is not None and cfg.supervision == "map_head":
            from lfi.train.controls import MapHead

            map_head = MapHead(self.student.embed_dim, len(self.concepts)).to(self.device)
        if self.teacher is not None and cfg.supervision == "logits":
            classifier = self._fit_teacher_classifier()
        self.step_module = LFIStep(self.student, self.loss_fn, self.lam, cfg.label_smoothing, cfg.supervision,
                                   map_head, classifier, cfg.kd_temperature)
        self.model = self.step_module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(_param_groups(self.step_module, cfg.weight_decay), lr=cfg.lr,
                                           betas=(0.9, 0.999))
        self._build_loaders()
        self.steps_per_epoch = len(self.train_loader)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.total_steps = max(1, cfg.epochs * self.steps_per_epoch)
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.global_step, self.start_epoch, self.history = 0, 0, []
        self._partial: Optional[dict] = None
        amp = cfg.amp
        if amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {amp!r}")
        self.amp_dtype = torch.bfloat16 if (amp == "bf16" or (amp == "auto" and self.device.type == "cuda")) else None
        if cfg.resume:
            self._resume(cfg.resume)

    def _fit_teacher_classifier(self):
        """The distillation control's teacher: the leak-check classifier fitted on the training set's
        teacher outputs (lfi.train.controls)."""
        from torch.utils.data import DataLoader

        from lfi.train.controls import fit_map_classifier, teacher_features

        loader = DataLoader(self.data["train"], batch_size=256, shuffle=False, num_workers=0)
        x, y = teacher_features(self.teacher, loader, self.normalize, self.device)
        return fit_map_classifier(x, y, len(self.classes), "logistic", seed=self.cfg.seed).to(self.device)

    # --------------------------------------------------------------------------------------------
    def _check_run_dir(self):
        """Refuses an out folder that holds another run, unless resuming or overwriting (see the class)."""
        cfg = self.cfg
        out = Path(cfg.out).expanduser()
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} is a file, not a run folder")
        if cfg.resume and cfg.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite starts it over: give one of them")
        self._resuming = bool(cfg.resume) and (cfg.resume != "auto" or (out / "checkpoint.safetensors").is_file())
        found = existing_run_files(out)
        self._remove_old = bool(found) and cfg.overwrite
        if found and not self._resuming and not cfg.overwrite:
            why = " but no checkpoint to resume from" if cfg.resume == "auto" else ""
            raise FileExistsError(f"{out} already holds a run ({', '.join(found)}){why}: pass --resume auto to "
                                  "continue it, or --overwrite to start over (its run files are removed first)")

    def _check_config(self):
        cfg = self.cfg
        self._check_run_dir()
        if cfg.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if cfg.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if cfg.lam < 0:
            raise ValueError("lam must be >= 0")
        if not cfg.synthetic:
            p = Path(cfg.data).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"data path does not exist: {p}")
        if cfg.teacher not in ("synthetic", "none") and cfg.teacher_weights:
            w = Path(cfg.teacher_weights).expanduser()
            if not w.is_file():
                raise FileNotFoundError(f"teacher weights file not found: {w}")

    def _log(self, msg: str) -> None:
        if self.console is not None and self.main:
            self.console.print(msg)

    def _build_loaders(self):
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        cfg = self.cfg
        train = self.data["train"]
        self.sampler = DistributedSampler(train, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=False)
        workers = 0 if self.data["synthetic"] else cfg.workers
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(train, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=workers,
                                       pin_memory=pin, drop_last=False, persistent_workers=workers > 0)
        self.val_loader = None
        val = self.data["val"]
        if val is not None:
            shard = Subset(val, list(range(self.dist.rank, len(val), self.dist.world_size)))
            self.val_loader = DataLoader(shard, batch_size=max(cfg.batch_size, 256 if self.data["synthetic"] else 1),
                                         shuffle=False, num_workers=workers, pin_memory=pin)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Synthetic batches are [0, 1] images; ImageFolder batches are already normalised."""
        if not self.data["synthetic"]:
            return images
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --------------------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.safetensors"

    def meta(self, epoch: int) -> dict:
        return dict(config=self.cfg.to_dict(), student_spec=self.student.spec, classes=self.classes,
                    concepts=self.concepts, mean=list(self.mean), std=list(self.std), epoch=epoch,
                    global_step=self.global_step, history=self.history, world_size=self.dist.world_size)

    def save(self, epoch: int, path: Optional[Path] = None) -> Optional[Path]:
        if not self.main:
            return None
        return ckpt.save_checkpoint(path or self.checkpoint_path(), self.student, self.optimizer, self.meta(epoch))

    def _resume(self, spec: str):
        path = self.checkpoint_path() if spec == "auto" else Path(spec)
        if spec == "auto" and not path.is_file():
            self._log(f"[dim]resume=auto: no checkpoint at {path}, starting fresh[/dim]")
            return
        if self.cfg.supervision == "map_head":
            raise ValueError("resume is not supported with supervision='map_head' (the control's map head is not "
                             "part of the student checkpoint)")
        tensors, meta = ckpt.load_checkpoint(path)
        old = meta.get("config", {})
        for key in ("student", "queries", "student_kwargs", "img_size"):
            if key in old and old[key] != getattr(self.cfg, key):
                raise ValueError(f"cannot resume from {path}: it was trained with {key}={old[key]!r}, "
                                 f"this run has {getattr(self.cfg, key)!r}")
        self.student.load_state_dict(ckpt.model_state(tensors))
        self.optimizer.load_state_dict(ckpt.optimizer_state(tensors, meta))
        self.global_step = int(meta["global_step"])
        self.start_epoch = int(meta["epoch"]) + 1
        self.history = list(meta.get("history", []))
        self._partial = meta.get("interrupted")  # a mid-epoch checkpoint: where in start_epoch to continue
        if meta.get("world_size", 1) == self.dist.world_size:
            ckpt.restore_rng(tensors, meta.get("rng", {}))
        at = f", step {self._partial['steps']} of it" if self._partial else ""
        self._log(f"resumed from {path} (epoch {self.start_epoch + 1}{at}; global step {self.global_step})")

    # --------------------------------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        cfg = self.cfg
        images = self.normalize(batch[0].to(self.device, non_blocking=True))
        labels = batch[1].to(self.device, non_blocking=True)
        masks = batch[2].to(self.device, non_blocking=True) if len(batch) > 2 else None
        lr = lr_at(self.global_step, self.total_steps, self.warmup_steps, cfg.lr, cfg.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with self.autocast():
            tmaps = None
            if self.teacher is not None:
                needs_masks = getattr(self.teacher, "needs_masks", False)
                tmaps = self.teacher(images, masks) if needs_masks else self.teacher(images)
                if cfg.teacher_shuffle:
                    tmaps = shuffled(tmaps)
            loss, ce, kl, logits = self.model(images, labels, tmaps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.global_step += 1
        correct = (logits.argmax(-1) == labels).sum()
        return dict(loss=loss.detach(), ce=ce, kl=kl, correct=correct, n=labels.shape[0], lr=lr)

    def _epoch_batches(self, epoch: int, skip: int):
        """The epoch's batches, from batch `skip` on (a resumed mid-epoch checkpoint), in the order an
        uninterrupted epoch has (the sampler's order depends on (seed, epoch) only)."""
        from torch.utils.data import DataLoader

        self.sampler.set_epoch(epoch)
        if not skip:
            return iter(self.train_loader)
        bs, loader = self.cfg.batch_size, self.train_loader
        rest = list(self.sampler)[skip * bs:]
        resumed = DataLoader(loader.dataset, batch_size=bs, sampler=rest, num_workers=loader.num_workers,
                             pin_memory=loader.pin_memory, drop_last=False)
        state = torch.get_rng_state()
        batches = iter(resumed)
        torch.set_rng_state(state)  # the epoch's iterator drew its seed before the checkpoint: draw none now
        return batches

    def train_epoch(self, epoch: int, stop: Optional[StopRequest] = None) -> dict:
        """One epoch (the rest of it after a mid-epoch resume). With `stop`, returns early after the
        step during which Ctrl-C was pressed, with ``rec["interrupted"]`` = (steps done, partial sums)."""
        from lfi.data.folders import reset_skipped, skipped_images

        self.step_module.train()
        reset_skipped(self.data["train"])
        # loss*n, ce*n, kl*n, correct, n: accumulated on the device, so a step never waits for the GPU
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        skip, t_before = 0, 0.0
        if self._partial is not None and self._partial["epoch"] == epoch:
            skip, t_before = int(self._partial["steps"]), float(self._partial["time"])
            sums += torch.tensor(self._partial["sums"], dtype=torch.float64, device=self.device)
        self._partial = None
        batches = self._epoch_batches(epoch, skip)
        t0 = time.time() - t_before
        progress = None
        if self.main and self.cfg.progress and self.console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            progress = Progress(TextColumn(f"epoch {epoch + 1}/{self.cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
                                transient=True)
            task = progress.add_task("train", total=self.steps_per_epoch, completed=skip, info="")
            progress.start()
        lr, done = 0.0, skip
        try:
            for i, batch in enumerate(batches, start=skip):
                if i >= self.steps_per_epoch:
                    break
                r = self.train_step(batch)
                done = i + 1
                n = r["n"]
                sums += torch.stack([r["loss"].double() * n, r["ce"].double() * n, r["kl"].double() * n,
                                     r["correct"].double(), torch.full((), n, dtype=torch.float64, device=self.device)])
                lr = r["lr"]
                if progress is not None:
                    info = None
                    if i % 10 == 0 or i + 1 == self.steps_per_epoch:  # reading the sums synchronises
                        loss_avg, acc = (sums[0] / sums[4]).item(), (sums[3] / sums[4]).item()
                        info = f"loss {loss_avg:.3f}  acc {100 * acc:.1f}%"
                    progress.update(task, advance=1, **({"info": info} if info is not None else {}))
                if stop is not None and self._stop_agreed(stop) and done < self.steps_per_epoch:
                    return {"interrupted": dict(epoch=epoch, steps=done, sums=sums.cpu().tolist(),
                                                time=time.time() - t0)}
        finally:
            if progress is not None:
                progress.stop()
        sums = (all_reduce_sum(sums, self.dist) if self.dist.enabled else sums).cpu()
        n = max(sums[4].item(), 1.0)
        dt = time.time() - t0
        rec = dict(train_loss=sums[0].item() / n, train_ce=sums[1].item() / n, train_kl=sums[2].item() / n,
                   train_acc=sums[3].item() / n, lr=lr, epoch_time=dt, images_per_s=n / max(dt, 1e-9))
        skipped = skipped_images(self.data["train"])
        if skipped:  # unreadable files (each named in a warning), replaced by the next readable image
            rec["skipped_images"] = skipped
            self._log(f"[yellow]epoch {epoch + 1}: skipped {skipped} unreadable image(s) (named in the warnings "
                      "above; --strict stops at the first)[/yellow]")
        return rec

    def evaluate(self) -> dict:
        if self.val_loader is None:
            return {}
        teacher = self.eval_teacher
        r = evaluate(self.student, self.val_loader, self.device, teacher=teacher, loss_fn=self.loss_fn,
                     normalize=self.normalize if self.data["synthetic"] else None, map_topk=self.cfg.map_topk,
                     autocast=self.autocast if self.amp_dtype is not None else None,
                     dist=self.dist if self.dist.enabled else None)
        rec = {"val_acc": r["acc"], "val_kl": r["kl"], "map_score": r["map_score"]}
        if r["skipped_images"]:
            rec["val_skipped_images"] = r["skipped_images"]
            self._log(f"[yellow]validation: skipped {r['skipped_images']} unreadable image(s) (named in the "
                      "warnings above; --strict stops at the first)[/yellow]")
        return rec

    def run(self, max_epochs: Optional[int] = None) -> dict:
        """Trains from start_epoch to cfg.epochs (or only `max_epochs` more epochs; the schedule is
        still the one of cfg.epochs, so a later resume continues exactly)."""
        cfg = self.cfg
        metrics_path = self.out / "metrics.jsonl"
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self._remove_old:  # --overwrite: the old run's files go first, so nothing of it mixes in
                for name in RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
                self._remove_old = False
            ckpt.atomic_write_text(self.out / "config.json", cfg.dumps())
            if self.start_epoch > 0:  # resumed: metrics.jsonl holds exactly the checkpoint's epochs
                ckpt.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        barrier(self.dist)
        ov = self.student.overhead()
        self._log(f"student {cfg.student} ({ov['backbone_params'] / 1e6:.2f}M params) + {cfg.queries} queries "
                  f"(+{ov['params']} params, {ov['percent']:.3f}%), "
                  f"teacher {cfg.teacher if self.teacher is not None else 'none'}, "
                  f"lam {self.lam}, {len(self.data['train'])} train images, {self.steps_per_epoch} steps/epoch, "
                  f"device {self.device}" + (f" x{self.dist.world_size} (DDP)" if self.dist.enabled else ""))
        try:
            stop = cfg.epochs if max_epochs is None else min(cfg.epochs, self.start_epoch + max_epochs)
            with StopRequest() as interrupt:
                for epoch in range(self.start_epoch, stop):
                    rec = {"epoch": epoch + 1}
                    part = self.train_epoch(epoch, interrupt)
                    if "interrupted" in part:
                        self._interrupted(epoch - 1, part["interrupted"])
                    rec.update(part)
                    if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                        rec.update(self.evaluate())
                    rec["step"] = self.global_step
                    self.history.append(rec)
                    if self.main:
                        with open(metrics_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(rec) + "\n")
                        self._log(self._format(rec))
                    if self.on_epoch is not None and self.main:
                        self.on_epoch(rec)
                    last = epoch + 1 == stop
                    if cfg.save_every and ((epoch + 1) % cfg.save_every == 0 or last):
                        self.save(epoch)
                    if not last and self._stop_agreed(interrupt):
                        self._interrupted(epoch, None)
            barrier(self.dist)
        finally:
            cleanup_distributed(self.dist)
        return {"history": self.history, "checkpoint": str(self.checkpoint_path()) if cfg.save_every else None,
                "overhead": ov, "classes": self.classes, "concepts": self.concepts}

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether to stop now: Ctrl-C on any process (all-reduced under DDP, so every rank stops after
        the same step)."""
        if not self.dist.enabled:
            return stop.requested
        flag = torch.tensor([float(stop.requested)], device=self.device)
        return bool(all_reduce_sum(flag, self.dist).item() > 0)

    def _interrupted(self, completed_epoch: int, partial: Optional[dict]):
        """Saves the resumable checkpoint of an interrupted run and raises TrainingInterrupted.
        completed_epoch: index of the last finished epoch (-1: none); partial: the epoch in progress."""
        meta = self.meta(completed_epoch)
        if partial is not None:
            meta["interrupted"] = partial
        path = None
        if self.main:
            path = ckpt.save_checkpoint(self.checkpoint_path(), self.student, self.optimizer, meta)
        barrier(self.dist)
        err = TrainingInterrupted(path, completed_epoch + 2,
                                  partial["steps"] if partial else 0, self.steps_per_epoch)
        self._log(f"[yellow]{err}[/yellow]")
        raise err

    def _format(self, r: dict) -> str:
        s = (f"epoch {r['epoch']:>3}/{self.cfg.epochs}  loss {r['train_loss']:.4f} (ce {r['train_ce']:.4f}, "
             f"kl {r['train_kl']:.4f})  train acc {100 * r['train_acc']:5.1f}%")
        if r.get("val_acc") is not None:
            s += f"  val acc {100 * r['val_acc']:5.1f}%"
        if r.get("map_score") is not None:
            s += f"  map@k {r['map_score']:.3f}"
        return s + f"  lr {r['lr']:.2e}  {r['epoch_time']:.1f}s"


def run_training(cfg: TrainConfig, console=None, on_epoch=None) -> dict:
    """Convenience: Trainer(cfg).run()."""
    return Trainer(cfg, console=console, on_epoch=on_epoch).run()
