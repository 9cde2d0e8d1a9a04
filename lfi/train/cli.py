"""Training subcommands of the `lfi` console script: demo, train, eval, maps.

Wire into lfi/cli.py with ``add_subcommands(subparsers)``; each subcommand sets ``func`` (returns
an exit code). Standalone: ``python -m lfi.train <subcommand> ...`` (also under torchrun), or
``lfi.train.cli.main([...])``. With no subcommand, ``python -m lfi.train --data ...`` means train.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["add_subcommands", "main", "config_from_args"]

SUBCOMMANDS = ("demo", "train", "eval", "maps")
_USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, TypeError, KeyError)


def _kv(s: str) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} (ints/floats/bools parsed), or a JSON object."""
    s = s.strip()
    if not s:
        return {}
    if s.startswith("{"):
        return json.loads(s)
    out = {}
    for part in s.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        v = v.strip()
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        if v in ("true", "True"):
            v = True
        elif v in ("false", "False"):
            v = False
        out[k.strip()] = v
    return out


def _temperature(s: str):
    """'auto' or a float (the teacher's patch-softmax temperature)."""
    if s.strip().lower() == "auto":
        return "auto"
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {s!r}") from None


def _err(cmd: str, e: BaseException) -> int:
    print(f"lfi {cmd}: error: {e}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------
def _add_train_args(p: argparse.ArgumentParser) -> None:
    from lfi.train.config import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="ImageFolder root (root/<class>/<image>) or 'synthetic' (built-in task)")
    g.add_argument("--val-data", default=None, help="ImageFolder root for validation")
    g.add_argument("--val-split", type=float, default=d.val_split, help="hold out this fraction of --data for validation")
    g.add_argument("--img-size", type=int, default=None, help="input size (default 224; 32 for --data synthetic)")
    g.add_argument("--augment", default=d.augment, choices=["none", "flip", "crop+flip"])
    g.add_argument("--workers", type=int, default=d.workers)
    g.add_argument("--synthetic-train", type=int, default=None, help="built-in task: training images (default 1000)")
    g.add_argument("--synthetic-val", type=int, default=None, help="built-in task: validation images (default 500)")
    g.add_argument("--synthetic-task", default=d.synthetic_task, choices=["colour", "quadrant"],
                   help="built-in task: colour (the label is the striped object's colour) or quadrant (the first "
                        "demo's task, whose teacher maps give the label away)")
    g.add_argument("--synthetic-style", default=d.synthetic_style)
    g.add_argument("--synthetic-score-noise", type=float, default=d.synthetic_score_noise,
                   help="built-in teacher: noise on its presence scores (0 = it knows what is present)")
    g.add_argument("--synthetic-confuse", type=float, default=d.synthetic_confuse,
                   help="built-in teacher: fraction of its maps that are another object's map")
    g.add_argument("--synthetic-distractors", type=int, default=d.synthetic_distractors,
                   help="built-in task: distractor objects per image")
    g = p.add_argument_group("student")
    g.add_argument("--student", default=None, help="timm ViT name (default vit_small_patch16_224; the demo's tiny ViT "
                                                   "for --data synthetic)")
    g.add_argument("--student-weights", default=None, help="local timm weights file (never downloads)")
    g.add_argument("--student-kwargs", type=_kv, default=None,
                   help="timm.create_model kwargs, e.g. patch_size=4,embed_dim=48,depth=4,num_heads=3")
    g.add_argument("--queries", type=int, default=None, help="number of interaction queries K (default 8; 6 synthetic)")
    g.add_argument("--supervised-layers", default=d.supervised_layers, help="all | last | lastN | firstN | 3,5,7")
    g.add_argument("--read-back", default=None, choices=["off", "on", "gated"],
                   help="tokens attend the queries (default off)")
    g.add_argument("--head", default=d.head, choices=["cls", "cls+queries"])
    g.add_argument("--pos-embed-init", default=None, choices=["sincos"],
                   help="re-initialise the position embeddings with 2-D sin-cos (from-scratch students; default for "
                        "synthetic)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default=None, help="open_clip model name (e.g. ViT-B-16), 'synthetic' or 'none' "
                                                   "(default ViT-B-16; synthetic for --data synthetic)")
    g.add_argument("--teacher-weights", default=None, help="local open_clip weights file")
    g.add_argument("--teacher-random", action="store_true", help="allow a random-weight CLIP teacher (tests only)")
    g.add_argument("--teacher-kwargs", type=_kv, default=None, help="extra open_clip.create_model kwargs (JSON)")
    g.add_argument("--concepts", default=None, help="comma list or file, one concept per class (default: class names)")
    g.add_argument("--templates", default=None, help="'|'-separated prompt templates with {} (default: 4 photo prompts)")
    g.add_argument("--teacher-temperature", type=_temperature, default=d.teacher_temperature,
                   help="patch-softmax temperature of the CLIP teacher: a float (0.01 = the old fixed value) or "
                        "'auto' (default: per image, so that the valid maps' mean entropy is "
                        "--teacher-target-entropy * log(patches))")
    g.add_argument("--teacher-target-entropy", type=float, default=d.teacher_target_entropy,
                   help="with --teacher-temperature auto: target entropy as a fraction of log(patches), in (0, 1)")
    g.add_argument("--teacher-select", default=d.teacher_select, choices=["topk", "threshold", "all"],
                   help="concepts that supervise an image, from the teacher's zero-shot scores: topk (default: the "
                        "--teacher-topk best), threshold (probability >= --teacher-threshold, at least the top-1) "
                        "or all (multi-label data)")
    g.add_argument("--teacher-topk", type=int, default=d.teacher_topk,
                   help="with --teacher-select topk: concepts kept per image (default 1: the top class)")
    g.add_argument("--teacher-threshold", type=float, default=d.teacher_threshold,
                   help="with --teacher-select threshold: zero-shot probability a concept needs, in (0, 1]")
    g.add_argument("--quick-gelu", action="store_true", help="QuickGELU teacher (OpenAI weights)")
    g = p.add_argument_group("loss")
    g.add_argument("--lam", type=float, default=d.lam, help="interaction-loss weight (0 = baseline)")
    g.add_argument("--assignment", default=None, choices=["fixed", "topk", "hungarian"],
                   help="query-to-concept assignment (default fixed; topk when concepts > queries)")
    g.add_argument("--heads", default=d.heads, choices=["broadcast", "mean"])
    g.add_argument("--supervision", default=d.supervision, choices=["queries", "map_head", "logits"],
                   help="what the teacher trains: the interaction queries (LFI, default) or, as controls, an "
                        "output-level map head or the logits (distillation of a classifier on the teacher's output)")
    g.add_argument("--kd-temperature", type=float, default=d.kd_temperature, help="with --supervision logits")
    g.add_argument("--teacher-shuffle", action="store_true",
                   help="control: every image is supervised with the teacher output of another image")
    g.add_argument("--kl-temperature", type=float, default=d.kl_temperature)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=None, help="per process (default 64; 32 synthetic)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4; 1e-3 synthetic)")
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=float, default=None)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "off"], help="auto: bf16 on CUDA, off on CPU")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--deterministic", action="store_true")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--max-steps-per-epoch", type=int, default=None)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="run folder (checkpoint, metrics.jsonl, config.json)")
    g.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (OUT/checkpoint.safetensors)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="epochs between checkpoints (0 = no checkpoint; the last epoch is always saved otherwise)")
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quiet", action="store_true")


def config_from_args(args: argparse.Namespace):
    """TrainConfig from parsed `train` args (synthetic data switches the defaults to the demo's)."""
    from lfi.train.config import TrainConfig, demo_config

    synthetic = args.data == "synthetic"
    cfg = demo_config(progress=True, save_every=1, quiet=False) if synthetic else TrainConfig()
    direct = dict(data=args.data, val_data=args.val_data, val_split=args.val_split, augment=args.augment,
                  workers=args.workers, synthetic_distractors=args.synthetic_distractors, synthetic_style=args.synthetic_style,
                  synthetic_task=args.synthetic_task, synthetic_score_noise=args.synthetic_score_noise,
                  synthetic_confuse=args.synthetic_confuse, student_weights=args.student_weights, supervision=args.supervision,
                  kd_temperature=args.kd_temperature, teacher_shuffle=args.teacher_shuffle,
                  supervised_layers=args.supervised_layers, head=args.head, teacher_weights=args.teacher_weights,
                  teacher_random=args.teacher_random, concepts=args.concepts, templates=args.templates,
                  teacher_temperature=args.teacher_temperature, teacher_target_entropy=args.teacher_target_entropy,
                  teacher_select=args.teacher_select, teacher_topk=args.teacher_topk,
                  teacher_threshold=args.teacher_threshold, quick_gelu=args.quick_gelu, lam=args.lam,
                  heads=args.heads, kl_temperature=args.kl_temperature, epochs=args.epochs, min_lr=args.min_lr,
                  weight_decay=args.weight_decay, grad_clip=args.grad_clip, label_smoothing=args.label_smoothing,
                  amp=args.amp, seed=args.seed, deterministic=args.deterministic, device=args.device,
                  threads=args.threads, max_steps_per_epoch=args.max_steps_per_epoch, out=args.out,
                  resume=args.resume, save_every=args.save_every, eval_every=args.eval_every,
                  progress=not args.no_progress, quiet=args.quiet)
    optional = dict(img_size=args.img_size, student=args.student, student_kwargs=args.student_kwargs,
                    queries=args.queries, read_back=args.read_back, teacher=args.teacher,
                    pos_embed_init=args.pos_embed_init,
                    teacher_kwargs=args.teacher_kwargs, assignment=args.assignment, batch_size=args.batch_size,
                    lr=args.lr, warmup_epochs=args.warmup_epochs, synthetic_train=args.synthetic_train,
                    synthetic_val=args.synthetic_val)
    direct.update({k: v for k, v in optional.items() if v is not None})
    if synthetic and args.student is not None and args.student_kwargs is None:
        direct["student_kwargs"] = {}
    cfg = cfg.replace(**direct)
    if args.assignment is None and not synthetic:
        cfg = cfg.replace(assignment="auto")
    return cfg


def _checkpoint_clip_teacher(cfg, weights, student, concepts, mean, std, device):
    """The CLIP teacher of a checkpoint's config, built as in training (``build_teacher``: same
    templates, temperature and concept selection), with ``weights`` (default: the config's)."""
    from lfi.train.trainer import build_teacher

    return build_teacher(cfg.replace(teacher_weights=weights), student, concepts, mean, std, device, synthetic=False)


def cmd_train(args: argparse.Namespace) -> int:
    from lfi.train.trainer import Trainer

    try:
        cfg = config_from_args(args)
        trainer = Trainer(cfg)
        res = trainer.run()
    except _USER_ERRORS as e:
        return _err("train", e)
    if trainer.main and not cfg.quiet and res.get("checkpoint"):
        print(f"checkpoint: {res['checkpoint']}")
    return 0


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
def _add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CI smoke test: 1 seed, tiny model and data, < 1 minute")
    p.add_argument("--out", default="runs/demo", help="output folder (tables, plots, results.json, checkpoints)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default cores // jobs)")
    p.add_argument("--jobs", type=int, default=None, help="parallel training runs (default min(2, cores))")
    p.add_argument("--ablation", action="store_true", help="run the LFI variants (layers, weight, read-back, "
                   "queries) instead of the arms and controls")


def cmd_demo(args: argparse.Namespace) -> int:
    from lfi.train.demo import run_demo

    if args.seeds < 1:
        return _err("demo", ValueError(f"--seeds must be >= 1, got {args.seeds}"))
    try:
        run_demo(args.out, quick=args.quick, seeds=args.seeds, epochs=args.epochs, threads=args.threads,
                 jobs=args.jobs, ablation=args.ablation)
    except _USER_ERRORS as e:
        return _err("demo", e)
    return 0


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------
def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint.safetensors written by lfi train / lfi demo")
    p.add_argument("--data", required=True,
                   help="ImageFolder, a folder of domain ImageFolders (root/<domain>/<class>/<img>), or 'synthetic' "
                        "(the built-in task in all its styles)")
    p.add_argument("--teacher-weights", default=None, help="CLIP weights for the map score (default: the checkpoint's)")
    p.add_argument("--no-maps", action="store_true", help="skip the map-consistency score (no teacher needed)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--map-topk", type=float, default=0.1, help="fraction of patches for map@k")
    p.add_argument("--json", default=None, help="also write the results as JSON")


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        results = run_eval(args)
    except _USER_ERRORS as e:
        return _err("eval", e)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


def run_eval(args: argparse.Namespace) -> dict:
    import torch
    from rich.console import Console
    from rich.table import Table
    from torch.utils.data import DataLoader

    from lfi.nn.interaction_loss import InteractionLoss
    from lfi.train.checkpoint import load_student
    from lfi.train.config import TrainConfig
    from lfi.train.evaluate import evaluate
    from lfi.train.trainer import _resolve_device

    console = Console()
    device = _resolve_device(args.device)
    student, meta = load_student(args.checkpoint)
    student.to(device)
    cfg = TrainConfig.from_dict(meta.get("config", {}))
    classes, concepts = meta["classes"], meta["concepts"]
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    loss_fn = InteractionLoss(assignment=cfg.assignment if cfg.assignment != "auto" else "topk", heads=cfg.heads,
                              temperature=cfg.kl_temperature)
    img_size = student.img_size[0]
    domains = []  # (name, loader, normalize, teacher)
    if args.data == "synthetic":
        from lfi.data.synthetic import STYLES, SyntheticShapes
        from lfi.train.demo import SHIFT_SEED_OFFSET
        from lfi.train.trainer import synthetic_teacher

        teacher = None if args.no_maps else synthetic_teacher(cfg, concepts, student.grid).to(device)
        m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=device).view(1, 3, 1, 1)
        for style in STYLES:
            ds = SyntheticShapes(cfg.synthetic_val, img_size=img_size, concepts=concepts, style=style,
                                 task=cfg.synthetic_task, num_distractors=cfg.synthetic_distractors,
                                 seed=cfg.synthetic_seed + SHIFT_SEED_OFFSET)
            domains.append((f"synthetic-{style}", DataLoader(ds, batch_size=args.batch_size), lambda x: (x - m) / s,
                            teacher))
    else:
        from lfi.data.folders import build_transform, find_domains, load_imagefolder

        teacher = None
        if not args.no_maps and cfg.teacher not in ("none", "synthetic"):
            weights = args.teacher_weights or cfg.teacher_weights
            if weights is None and not cfg.teacher_random:
                raise ValueError("the map score needs the CLIP teacher's weights: pass --teacher-weights (or --no-maps)")
            teacher = _checkpoint_clip_teacher(cfg, weights, student, concepts, mean, std, device)
        tf = build_transform(img_size, mean, std, train=False)
        for name, path in find_domains(args.data):
            ds = load_imagefolder(path, tf, classes=classes)
            domains.append((name, DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers), None, teacher))
    table = Table(title=f"lfi eval {args.checkpoint}")
    for c in ("domain", "images", "accuracy", "map@k", "KL"):
        table.add_column(c, justify="right")
    results = {"domains": {}}
    for name, loader, norm, teacher in domains:
        r = evaluate(student, loader, device, teacher=teacher, loss_fn=loss_fn, normalize=norm, map_topk=args.map_topk)
        results["domains"][name] = r
        table.add_row(name, str(r["n"]), f"{100 * r['acc']:.2f}%",
                      "-" if r["map_score"] is None else f"{r['map_score']:.3f}",
                      "-" if r["kl"] is None else f"{r['kl']:.4f}")
    accs = [r["acc"] for r in results["domains"].values()]
    maps = [r["map_score"] for r in results["domains"].values() if r["map_score"] is not None]
    results["mean_acc"] = sum(accs) / len(accs)
    results["mean_map_score"] = sum(maps) / len(maps) if maps else None
    table.add_section()
    table.add_row("mean", "", f"{100 * results['mean_acc']:.2f}%",
                  "-" if results["mean_map_score"] is None else f"{results['mean_map_score']:.3f}", "")
    console.print(table)
    k = max(1, round(args.map_topk * student.num_patches))
    console.print(f"map@k: overlap of the top-{k} patches of the student's query maps (last supervised layer, head "
                  "mean) with the teacher's" + (" (ground-truth masks)" if args.data == "synthetic" else "")
                  + f"; chance ~ {k / student.num_patches:.2f}")
    return results


# ------------------------------------------------------------------------------------------------
# maps
# ------------------------------------------------------------------------------------------------
def _add_maps_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="*", help="image files (any size: resized and centre-cropped to the student's)")
    p.add_argument("--synthetic", type=int, nargs="*", default=None, metavar="INDEX",
                   help="render validation images of the built-in task (with ground-truth teacher maps)")
    p.add_argument("--out", default=None, help="PNG path (default: next to the checkpoint, maps.png)")
    p.add_argument("--teacher-weights", default=None, help="CLIP weights (default: the checkpoint's)")
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--device", default="cpu")


def cmd_maps(args: argparse.Namespace) -> int:
    try:
        path = run_maps(args)
    except _USER_ERRORS as e:
        return _err("maps", e)
    print(f"wrote {path}")
    return 0


def run_maps(args: argparse.Namespace) -> Path:
    import torch

    from lfi.nn.interaction_loss import InteractionLoss
    from lfi.train.checkpoint import load_student
    from lfi.train.config import TrainConfig
    from lfi.train.maps import collect_maps, render_maps
    from lfi.train.trainer import _resolve_device
    from lfi.train.visualize import denormalize

    device = _resolve_device(args.device)
    student, meta = load_student(args.checkpoint)
    student.to(device)
    cfg = TrainConfig.from_dict(meta.get("config", {}))
    concepts, mean, std = meta["concepts"], tuple(meta["mean"]), tuple(meta["std"])
    loss_fn = InteractionLoss(assignment=cfg.assignment if cfg.assignment != "auto" else "topk", heads=cfg.heads)
    img_size = student.img_size
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("maps.png")
    masks, teacher = None, None
    if args.synthetic is not None or (not args.images and cfg.data == "synthetic"):
        from lfi.data.synthetic import SyntheticShapes
        from lfi.train.trainer import synthetic_teacher

        idx = args.synthetic or [0, 1, 2]
        ds = SyntheticShapes(max(idx) + 1, img_size=img_size[0], concepts=concepts, task=cfg.synthetic_task,
                             num_distractors=cfg.synthetic_distractors, style=cfg.synthetic_style,
                             seed=cfg.synthetic_seed + 7919)
        imgs01, _, masks = ds.tensors()
        imgs01, masks = imgs01[idx], masks[idx].to(device)
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        images = ((imgs01 - m) / s).to(device)
        if not args.no_teacher:
            teacher = synthetic_teacher(cfg, concepts, student.grid)
    else:
        if not args.images:
            raise ValueError("give image files (or --synthetic INDEX for a checkpoint trained on the synthetic task)")
        from PIL import Image

        from lfi.data.folders import build_transform

        tf = build_transform(img_size[0], mean, std, train=False)
        batch = []
        for f in args.images:
            p = Path(f).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"image not found: {p}")
            batch.append(tf(Image.open(p).convert("RGB")))
        images = torch.stack(batch).to(device)
        if not args.no_teacher and cfg.teacher not in ("none", "synthetic"):
            weights = args.teacher_weights or cfg.teacher_weights
            if weights is None and not cfg.teacher_random:
                raise ValueError("the teacher's maps need its weights: pass --teacher-weights (or --no-teacher)")
            teacher = _checkpoint_clip_teacher(cfg, weights, student, concepts, mean, std, device)
    maps = collect_maps(student, images, teacher=teacher, masks=masks, loss_fn=loss_fn)
    pics = [denormalize(images[b], mean, std) for b in range(images.shape[0])]
    preds = maps["logits"].argmax(-1).tolist()
    title = "predicted: " + ", ".join(meta["classes"][p] for p in preds)
    return render_maps(pics, maps, out, title=title)


# ------------------------------------------------------------------------------------------------
def add_subcommands(subparsers) -> None:
    """Adds demo, train, eval and maps to an argparse subparsers object (each sets func=...)."""
    p = subparsers.add_parser("demo", help="built-in experiment: baseline vs LFI on a synthetic task (CPU, minutes)")
    _add_demo_args(p)
    p.set_defaults(func=cmd_demo)
    p = subparsers.add_parser("train", help="train a ViT student with interaction supervision (DDP via torchrun)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = subparsers.add_parser("eval", help="accuracy per domain and map consistency of a checkpoint")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval)
    p = subparsers.add_parser("maps", help="PNG of teacher vs student interaction maps per layer")
    _add_maps_args(p)
    p.set_defaults(func=cmd_maps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfi", description="LFI training: demo, train, eval, maps")
    sub = p.add_subparsers(dest="command", metavar="{demo,train,eval,maps}")
    add_subcommands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train"] + argv  # `python -m lfi.train --data ...` (torchrun) means train
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
