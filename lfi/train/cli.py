"""Training subcommands of the `lfi` console script: demo, train, eval, maps.

Wire into lfi/cli.py with ``add_subcommands(subparsers)``; each subcommand sets ``func`` (returns
an exit code). Standalone: ``python -m lfi.train <subcommand> ...`` (also under torchrun), or
``lfi.train.cli.main([...])``. With no subcommand, ``python -m lfi.train --data ...`` means train.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from lfi._command import run_command
from lfi.train.config import TrainConfig, demo_config

__all__ = ["add_subcommands", "main", "config_from_args"]

SUBCOMMANDS = ("demo", "train", "eval", "maps")
_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError, TypeError,
                KeyError)


def _err(cmd: str, e: BaseException) -> int:
    print(f"lfi {cmd}: error: {e}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------
_GROUPS = ("data", "student", "teacher", "loss", "optimisation", "output")


def _flag_fields():
    """(field, Flag, argparse dest, argparse type) for every TrainConfig field that is an `lfi train`
    flag. The type is Flag.type, else the field's int / float / str type; bool fields are switches."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Union and len(args) == 1:  # Optional[X]
            hint = args[0]
        if hint is bool:
            if f.default is not flag.negate:  # store_true: off by default, or --no-x for a field on by default
                raise TypeError(f"TrainConfig.{f.name}: a bool flag needs default False (or True with negate)")
            kind = bool
        elif flag.type is not None:
            kind = flag.type
        elif hint in (int, float, str):
            kind = hint
        else:
            raise TypeError(f"TrainConfig.{f.name}: give its Flag a type= (an argparse type for {hint})")
        yield f, flag, flag.flag_name(f.name)[2:].replace("-", "_"), kind


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field with Flag metadata (lfi/train/config.py), in field order within
    the --help sections of _GROUPS."""
    groups = {name: p.add_argument_group(name) for name in _GROUPS}
    for f, flag, _, kind in _flag_fields():
        g = groups[flag.group]
        if kind is bool:
            g.add_argument(flag.flag_name(f.name), action="store_true", help=flag.help)
            continue
        default = None if flag.if_given else (f.default_factory() if f.default is dataclasses.MISSING else f.default)
        kw = {} if kind is str else {"type": kind}
        if flag.choices is not None:
            kw["choices"] = list(flag.choices)
        g.add_argument(flag.flag_name(f.name), default=default, help=flag.help, **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed `train` args (synthetic data switches the defaults to the demo's).

    A flag whose Flag has ``if_given`` and was not given keeps the base config's value: the demo's
    (``demo_config``) for ``--data synthetic``, else TrainConfig's; every other flag sets its field.
    """
    synthetic = args.data == "synthetic"
    cfg = demo_config(progress=True, save_every=1, quiet=False) if synthetic else TrainConfig()
    values = {}
    for f, flag, dest, _ in _flag_fields():
        value = getattr(args, dest)
        if flag.negate:
            value = not value
        elif flag.if_given and value is None:
            continue
        values[f.name] = value
    if synthetic and args.student is not None and args.student_kwargs is None:
        values["student_kwargs"] = {}  # another timm model: not the demo's tiny-ViT kwargs
    return cfg.replace(**values)


def _checkpoint_clip_teacher(cfg, weights, student, concepts, mean, std, device):
    """The CLIP teacher of a checkpoint's config, as `lfi eval` / `lfi maps` build it
    (``lfi.train.evaluation.checkpoint_teacher``, i.e. the trainer's ``build_teacher``)."""
    from lfi.train.evaluation import checkpoint_teacher

    return checkpoint_teacher(cfg, student, concepts, mean, std, device, synthetic_data=False, weights=weights)


def cmd_train(args: argparse.Namespace) -> int:
    from lfi.train.interrupt import TrainingInterrupted
    from lfi.train.trainer import Trainer

    try:
        cfg = config_from_args(args)
        trainer = Trainer(cfg)
        res = trainer.run()
    except _USER_ERRORS as e:
        return _err("train", e)
    except TrainingInterrupted as e:
        print(f"lfi train: {e}", file=sys.stderr)
        return 130
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
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo with the same options: "
                   "finished runs are reused, unfinished ones continue from their checkpoints (without it, every "
                   "run starts over)")


def cmd_demo(args: argparse.Namespace) -> int:
    from lfi.train.demo import run_demo

    if args.seeds < 1:
        return _err("demo", ValueError(f"--seeds must be >= 1, got {args.seeds}"))
    try:
        run_demo(args.out, quick=args.quick, seeds=args.seeds, epochs=args.epochs, threads=args.threads,
                 jobs=args.jobs, ablation=args.ablation, resume=args.resume)
    except _USER_ERRORS as e:
        return _err("demo", e)
    except KeyboardInterrupt as e:
        print(f"lfi demo: {e}", file=sys.stderr)
        return 130
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
    p.add_argument("--json", default=None, help="also write the results as JSON (its folder must exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def cmd_eval(args: argparse.Namespace) -> int:
    from lfi.train.checkpoint import atomic_write_text, check_output_path
    from lfi.train.evaluation import evaluate_checkpoint, load_for_eval

    try:
        if args.json:  # before any work
            check_output_path(args.json, args.overwrite, "--json file")
        ck = load_for_eval(args.checkpoint, args.device)
        results = evaluate_checkpoint(ck, args.data, batch_size=args.batch_size, workers=args.workers,
                                      maps=not args.no_maps, teacher_weights=args.teacher_weights,
                                      map_topk=args.map_topk)
    except _USER_ERRORS as e:
        return _err("eval", e)
    _print_eval(results, args.checkpoint, ck.student.num_patches, args.map_topk, synthetic=args.data == "synthetic")
    if args.json:
        atomic_write_text(Path(args.json).expanduser(), json.dumps(results, indent=1))
    return 0


def _print_eval(results: dict, checkpoint, num_patches: int, map_topk: float, synthetic: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lfi eval {checkpoint}")
    for c in ("domain", "images", "accuracy", "map@k", "KL"):
        table.add_column(c, justify="right")
    for name, r in results["domains"].items():
        table.add_row(name, str(r["n"]), f"{100 * r['acc']:.2f}%",
                      "-" if r["map_score"] is None else f"{r['map_score']:.3f}",
                      "-" if r["kl"] is None else f"{r['kl']:.4f}")
    table.add_section()
    table.add_row("mean", "", f"{100 * results['mean_acc']:.2f}%",
                  "-" if results["mean_map_score"] is None else f"{results['mean_map_score']:.3f}", "")
    console = Console()
    console.print(table)
    for name, r in results["domains"].items():
        if r.get("skipped_images"):
            console.print(f"[yellow]{name}: {r['skipped_images']} unreadable image(s) skipped (named in the warnings "
                          "above; each replaced by the next readable one)[/yellow]")
    k = max(1, round(map_topk * num_patches))
    console.print(f"map@k: overlap of the top-{k} patches of the student's query maps (last supervised layer, head "
                  "mean) with the teacher's" + (" (ground-truth masks)" if synthetic else "")
                  + f"; chance ~ {k / num_patches:.2f}")


# ------------------------------------------------------------------------------------------------
# maps
# ------------------------------------------------------------------------------------------------
def _add_maps_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="*", help="image files (any size: resized and centre-cropped to the student's)")
    p.add_argument("--synthetic", type=int, nargs="*", default=None, metavar="INDEX",
                   help="render validation images of the built-in task (with ground-truth teacher maps)")
    p.add_argument("--out", default=None, help="PNG path (default: next to the checkpoint, maps.png; its folder must "
                   "exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--teacher-weights", default=None, help="CLIP weights (default: the checkpoint's)")
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--device", default="cpu")


def cmd_maps(args: argparse.Namespace) -> int:
    from lfi.train.checkpoint import check_output_path
    from lfi.train.evaluation import load_for_eval
    from lfi.train.maps import checkpoint_maps_png

    try:
        out = Path(args.out) if args.out else Path(args.checkpoint).expanduser().with_name("maps.png")
        out = check_output_path(out, args.overwrite, "maps PNG")  # before any work
        ck = load_for_eval(args.checkpoint, args.device)
        path = checkpoint_maps_png(ck, out, images=args.images, synthetic=args.synthetic,
                                   teacher=not args.no_teacher, teacher_weights=args.teacher_weights)
    except _USER_ERRORS as e:
        return _err("maps", e)
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------
def add_subcommands(subparsers) -> None:
    """Adds demo, train, eval and maps to an argparse subparsers object (each sets func=...)."""
    specs = {  # name: (help, adds the subcommand's arguments, runs it)
        "demo": ("built-in experiment: baseline vs LFI on a synthetic task (CPU, minutes)", _add_demo_args, cmd_demo),
        "train": ("train a ViT student with interaction supervision (DDP via torchrun)", _add_train_args, cmd_train),
        "eval": ("accuracy per domain and map consistency of a checkpoint", _add_eval_args, cmd_eval),
        "maps": ("PNG of teacher vs student interaction maps per layer", _add_maps_args, cmd_maps),
    }
    for name in SUBCOMMANDS:
        help_text, add_args, func = specs[name]
        p = subparsers.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfi", description="LFI training: demo, train, eval, maps")
    sub = p.add_subparsers(dest="command", metavar="{demo,train,eval,maps}")
    add_subcommands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train"] + argv  # `python -m lfi.train --data ...` (torchrun) means train
    # the subcommands report their own user errors (_err); anything else is a bug: traceback
    return run_command(build_parser(), argv)
