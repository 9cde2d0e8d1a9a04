"""`lfi demo`: LFI against a plain ViT and controls on the synthetic colour task (docs/METHOD.md, 7).

Task: ``lfi.data.SyntheticShapes(task="colour")`` — the class is the colour of the striped object;
the teacher (``SyntheticTeacher``: blurred maps, its own presence scores, confusions) only knows
where each pattern is, so its output alone does not give the label (measured: the leak check).
Every arm trains the same tiny ViT on the same data, schedule and seeds; only the use of the
teacher differs (ARMS). Metrics per arm: accuracy-vs-epoch AUC, epochs to 90 % of the plain ViT's
final accuracy, final and shifted-domain accuracy (mean and std over seeds), time per run, and how
much of the model's own CLS attention (last block, best head) lies on the striped object.

Writes to --out: results.json, table.md, accuracy.png, accuracy_low_data.png, maps.png and the
seed-0 checkpoint of every arm (<arm>_seed0/checkpoint.safetensors, for `lfi eval` / `lfi maps`).
``--ablation`` runs the LFI variants of ABLATIONS (layers, weight, read-back, queries) instead.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from lfi.train.checkpoint import atomic_write_text
from lfi.train.config import SHIFT_SEED_OFFSET, demo_config

__all__ = ["ARMS", "LOW_DATA_ARMS", "ABLATIONS", "run_demo", "epochs_to_target", "curve_auc", "cls_attention"]

REGISTERS = 6  # = the demo's number of queries: the parameter-matched control
NOISIER = dict(synthetic_sigma=1.5, synthetic_score_noise=0.6, synthetic_confuse=0.4)
# arm -> (overrides of demo_config, what it controls for)
ARMS = {
    "plain ViT": (dict(lam=0.0), "the headline baseline: the timm ViT, no teacher"),
    "ViT + registers": (dict(lam=0.0, reg_tokens=REGISTERS), f"{REGISTERS} register tokens: parameters / tokens"),
    "LFI": (dict(), "interaction queries, read-back off (the prediction path is the plain ViT's)"),
    "LFI read-back": (dict(read_back="on"), "interaction queries the tokens attend to"),
    "map head": (dict(supervision="map_head"), "the same maps on an output-level head"),
    "logit distillation": (dict(supervision="logits"), "the teacher's label information, as logits"),
    "LFI shuffled teacher": (dict(teacher_shuffle=True), "maps of another image"),
    "LFI noisier teacher": (dict(**NOISIER), "blur 1.5, score noise 0.6, 40 % confusions"),
}
LOW_DATA_TRAIN = 250
LOW_DATA_ARMS = ("plain ViT", "ViT + registers", "LFI", "LFI read-back")
SHIFT_STYLES = ("textured", "noisy")
ABLATIONS = {
    "plain ViT": dict(lam=0.0),
    "LFI (all layers, lam 1)": dict(),
    "LFI last 2 layers": dict(supervised_layers="last2"),
    "LFI last layer": dict(supervised_layers="last"),
    "LFI lam 0.3": dict(lam=0.3),
    "LFI lam 3": dict(lam=3.0),
    "LFI read-back gated": dict(read_back="gated"),
    "LFI 12 queries, topk": dict(queries=12, assignment="topk"),
}
QUICK = dict(synthetic_train=240, synthetic_val=120, epochs=2, batch_size=32,
             student_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))


def epochs_to_target(accs, target: float) -> Optional[int]:
    """First epoch (1-based) whose accuracy is >= target, or None."""
    for i, a in enumerate(accs):
        if a is not None and a >= target:
            return i + 1
    return None


def curve_auc(accs) -> float:
    """Normalised area under the accuracy-vs-epoch curve: the mean accuracy over epochs (0-1)."""
    return statistics.fmean(accs)


def _config(arm_overrides: dict, base_overrides: dict):
    over = dict(arm_overrides)
    regs = over.pop("reg_tokens", 0)
    cfg = demo_config(**{**base_overrides, **over})
    if regs:
        cfg = cfg.replace(student_kwargs={**cfg.student_kwargs, "reg_tokens": regs})
    return cfg


@torch.no_grad()
def cls_attention(student, images, object_masks, grid) -> tuple:
    """Where the model's own CLS token looks: its last block's attention over the patch tokens
    (renormalised over the patches), per head, against the object's patches (coverage >= 1/4).

    -> (best-head mean mass on the object, chance = mean object fraction of the patches,
    best head's maps (B, gh, gw))."""
    import torch.nn.functional as F

    from lfi.nn.interaction_queries import _project

    blk = student.vit.blocks[-1]
    seen = {}
    hook = blk.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    try:
        student(images)
    finally:
        hook.remove()
    q, k, _ = _project(blk.attn, seen["h"])
    P, Np = student.num_prefix, grid[0] * grid[1]
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k[:, :, P:P + Np].float()) * blk.attn.scale
    attn = scores.softmax(-1)  # (B, H, Np)
    obj = (F.adaptive_avg_pool2d(object_masks[:, None].float(), tuple(grid)).flatten(1) >= 0.25).float()
    mass = (attn * obj[:, None]).sum(-1).mean(0)  # (H,)
    best = int(mass.argmax())
    return float(mass[best]), float(obj.mean()), attn[:, best].reshape(-1, *grid)


def _run_arm(cfg_dict: dict, threads: int, shift_n: int) -> dict:
    """One training run (in a worker process) -> history, time, shifted accuracy, CLS attention."""
    from torch.utils.data import DataLoader

    from lfi.data.synthetic import SyntheticShapes
    from lfi.train.config import TrainConfig
    from lfi.train.evaluation import evaluate
    from lfi.train.trainer import Trainer

    torch.set_num_threads(max(1, threads))
    cfg = TrainConfig.from_dict(cfg_dict)
    t0 = time.time()
    trainer = Trainer(cfg)
    res = trainer.run()
    elapsed = time.time() - t0
    student = trainer.student.eval()
    val = trainer.data["val"]
    shift = {}
    for style in SHIFT_STYLES:
        ds = SyntheticShapes(shift_n, img_size=cfg.img_size, concepts=val.concepts, task=val.task,
                             num_distractors=val.num_distractors, style=style,
                             seed=cfg.synthetic_seed + SHIFT_SEED_OFFSET)
        shift[style] = evaluate(student, DataLoader(ds, batch_size=256), trainer.device,
                                normalize=trainer.normalize)["acc"]
    images, _, masks = val.tensors()
    target = val.concepts.index(val.target)
    mass, chance, _ = cls_attention(student, trainer.normalize(images[:256]), masks[:256, target], student.grid)
    result = dict(history=res["history"], time=elapsed, shift=shift, cls_mass=mass, cls_chance=chance,
                  checkpoint=res["checkpoint"])
    # the run's outcome next to its checkpoint, so that `lfi demo --resume` never trains it again
    atomic_write_text(Path(cfg.out) / RESULT_FILE, json.dumps(dict(result, config=_comparable(cfg)), default=str))
    return result


RESULT_FILE = "demo_result.json"


def _comparable(cfg) -> dict:
    """A run's config without the fields that say how it was started (resume / overwrite)."""
    d = cfg.to_dict()
    for key in ("resume", "overwrite"):
        d.pop(key, None)
    return json.loads(json.dumps(d, default=str))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _prepare_run(cfg, resume: bool):
    """-> (cfg to train, finished result or None). The demo owns its run folders: without `resume` a
    run starts over (its old files removed); with it, a finished run whose config matches is reused
    and an unfinished one continues from its checkpoint (every demo run checkpoints each epoch)."""
    cfg = cfg.replace(save_every=1)
    run, same = Path(cfg.out), _comparable(cfg)
    if resume:
        done = _read_json(run / RESULT_FILE)
        if done is not None and done.pop("config", None) == same:
            return cfg, done
        started = _read_json(run / "config.json")
        if (run / "checkpoint.safetensors").is_file() and started is not None and _comparable(
                cfg.from_dict(started)) == same:
            return cfg.replace(resume="auto", overwrite=False), None
    (run / RESULT_FILE).unlink(missing_ok=True)
    return cfg.replace(overwrite=True, resume=None), None


def _leak(base) -> dict:
    """The leak check on the demo's task (and, for contrast, on the first demo's quadrant task)."""
    from torch.utils.data import DataLoader

    from lfi.train.controls import leak_check, teacher_features
    from lfi.train.trainer import synthetic_datasets, synthetic_teacher

    out = {}
    for task in ("colour", "quadrant"):
        cfg = base.replace(synthetic_task=task)
        train, val = synthetic_datasets(cfg)
        grid = (cfg.img_size // cfg.student_kwargs["patch_size"],) * 2
        teacher = synthetic_teacher(cfg, train.concepts, grid)
        xt, yt = teacher_features(teacher, DataLoader(train, batch_size=256))
        xv, yv = teacher_features(teacher, DataLoader(val, batch_size=256))
        r = leak_check(xt, yt, xv, yv, len(train.classes))
        r.pop("classifier")
        out[task] = r
    return out


def _mean_std(xs) -> tuple:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(m, s, pct: bool = True) -> str:
    if m is None:
        return "-"
    k = 100 if pct else 1
    return f"{k * m:.1f} ± {k * s:.1f}"


def summarize(results: dict, epochs: int, reference: str = "plain ViT") -> dict:
    """results: {arm: [run dict per seed]} -> per-arm metrics; the epoch target is 90 % of the
    reference arm's mean final accuracy."""
    ref_final = statistics.fmean(r["history"][-1]["val_acc"] for r in results[reference])
    target = 0.9 * ref_final
    out = {"target": target}
    for arm, runs in results.items():
        curves = [[h["val_acc"] for h in r["history"]] for r in runs]
        ett = [epochs_to_target(c, target) for c in curves]
        med = statistics.median([e if e is not None else epochs + 1 for e in ett])
        row = dict(curves=curves, auc=_mean_std([curve_auc(c) for c in curves]),
                   final=_mean_std([c[-1] for c in curves]), epochs_to_target=ett, median_epochs=med,
                   time=statistics.fmean(r["time"] for r in runs),
                   cls_mass=_mean_std([r["cls_mass"] for r in runs]),
                   cls_chance=statistics.fmean(r["cls_chance"] for r in runs))
        for style in SHIFT_STYLES:
            row[style] = _mean_std([r["shift"][style] for r in runs])
        out[arm] = row
    return out


def _table(summary: dict, arms, epochs: int, title: str):
    from rich.markup import escape
    from rich.table import Table

    cols = ["arm", "AUC %", "epochs to target", "final %"] + [f"{s} %" for s in SHIFT_STYLES] + \
        ["CLS on object", "s/run"]
    t = Table(title=escape(title))
    for c in cols:
        t.add_column(c, justify="right")
    md = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for arm in arms:
        s = summary[arm]
        per = ", ".join(str(e) if e is not None else f">{epochs}" for e in s["epochs_to_target"])
        med = f">{epochs}" if s["median_epochs"] > epochs else f"{s['median_epochs']:g}"
        cells = [arm, _fmt(*s["auc"]), f"{med} ({per})", _fmt(*s["final"])] + \
            [_fmt(*s[st]) for st in SHIFT_STYLES] + \
            [f"{s['cls_mass'][0]:.2f} (chance {s['cls_chance']:.2f})", f"{s['time']:.0f}"]
        t.add_row(*[escape(c) for c in cells])
        md.append("| " + " | ".join(cells) + " |")
    return t, "\n".join(md)


def _headline(summary: dict, lfi: str = "LFI", ref: str = "plain ViT") -> str:
    a, b = summary[lfi], summary[ref]
    controls = [k for k in ("ViT + registers", "map head", "logit distillation") if k in summary]
    best = max(controls, key=lambda k: summary[k]["auc"][0]) if controls else None
    ratio = b["median_epochs"] / a["median_epochs"]
    text = (f"{lfi} vs {ref}: AUC {100 * a['auc'][0]:.1f} vs {100 * b['auc'][0]:.1f} "
            f"({a['auc'][0] / b['auc'][0]:.2f}x), median epochs to target {a['median_epochs']:g} vs "
            f"{b['median_epochs']:g} ({ratio:.2f}x fewer), final {100 * a['final'][0]:.1f} vs "
            f"{100 * b['final'][0]:.1f}")
    for st in SHIFT_STYLES:
        text += f", {st} {100 * a[st][0]:.1f} vs {100 * b[st][0]:.1f}"
    if best is not None:
        text += f". Best control ({best}): AUC {100 * summary[best]['auc'][0]:.1f}"
    return text


def _maps_png(results: dict, base, path, arms=("plain ViT", "LFI", "LFI read-back"), n_images: int = 4):
    """Teacher map of the striped object and the seed-0 models' own CLS attention (best head)."""
    from lfi.train.checkpoint import load_student
    from lfi.train.trainer import synthetic_datasets, synthetic_teacher
    from lfi.train.visualize import plot_maps

    _, val = synthetic_datasets(base)
    imgs01, _, masks = val.tensors()
    imgs01, masks = imgs01[:n_images], masks[:n_images]
    target = val.concepts.index(val.target)
    rows = [[] for _ in range(n_images)]
    for arm in arms:
        ck = results.get(arm, [{}])[0].get("checkpoint")
        if not ck:
            continue
        student, meta = load_student(ck)
        student.eval()
        mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
        if not rows[0]:
            teacher = synthetic_teacher(base, val.concepts, student.grid)
            tm = teacher(None, masks).probs[:, target]
            for b in range(n_images):
                rows[b].append(("teacher", tm[b][None].numpy()))
        _, _, maps = cls_attention(student, (imgs01 - mean) / std, masks[:, target], student.grid)
        for b in range(n_images):
            rows[b].append((arm, maps[b][None].numpy()))
    pics = [imgs01[b].permute(1, 2, 0).numpy() for b in range(n_images)]
    return plot_maps(pics, rows, path, col_titles=[f"'{val.target}' object / CLS attention (best head)"],
                     title="teacher map vs each model's own CLS attention (last block, seed 0)")


def _pool_run(jobs: list, n_jobs: int, threads: int, shift_n: int, on_done) -> None:
    """Runs (key, cfg) jobs in `n_jobs` spawned worker processes (inline when n_jobs == 1)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if n_jobs <= 1:
        for key, cfg in jobs:
            on_done(key, _run_arm(cfg.to_dict(), threads, shift_n))
        return
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn")) as ex:
        futs = [(key, ex.submit(_run_arm, cfg.to_dict(), threads, shift_n)) for key, cfg in jobs]
        try:
            for key, f in futs:
                on_done(key, f.result())
        except BaseException:  # Ctrl-C: runs not started yet never start; running ones checkpoint and stop
            ex.shutdown(wait=True, cancel_futures=True)
            raise


def run_demo(out="runs/demo", *, quick: bool = False, seeds: int = 3, epochs: Optional[int] = None,
             threads: Optional[int] = None, jobs: Optional[int] = None, ablation: bool = False, console=None,
             resume: bool = False, **overrides) -> dict:
    """Trains every arm (or, with ``ablation``, every ABLATIONS variant) for the same budget over
    `seeds` seeds and writes the tables and plots (see module docstring). Returns results.json's dict.

    resume: continue an interrupted experiment with the same options: finished runs are reused,
    unfinished ones continue from their checkpoints; without it every run starts over. Ctrl-C stops
    each run at a step boundary with a checkpoint and raises KeyboardInterrupt saying how to resume."""
    from rich.console import Console

    from lfi.train.visualize import plot_curves

    if console is None:
        console = Console() if Console().is_terminal else Console(width=140)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_over = dict(QUICK if quick else {})
    if epochs is not None:
        base_over["epochs"] = int(epochs)
    base_over.update(overrides)
    seeds = 1 if quick else int(seeds)
    base = demo_config(**base_over)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_jobs = max(1, min(2, cores) if jobs is None else int(jobs))
    threads = max(1, cores // n_jobs) if threads is None else int(threads)
    shift_n = base.synthetic_val
    arms = dict(ABLATIONS) if ablation else {k: v[0] for k, v in ARMS.items()}
    low_arms = () if (ablation or quick) else LOW_DATA_ARMS
    t_all = time.time()
    console.print(f"[bold]lfi demo[/bold]{' --quick' if quick else ''}{' --ablation' if ablation else ''}: "
                  f"{len(arms)} arms x {seeds} seeds (+ {len(low_arms)} low-data arms), {base.epochs} epochs, "
                  f"{base.synthetic_train} train / {base.synthetic_val} val images of the "
                  f"'{base.synthetic_task}' task, "
                  f"student {base.student} {base.student_kwargs}; {n_jobs} parallel run(s) x {threads} thread(s)")
    leak = None
    if not ablation:
        leak = _leak(base)
        c, q = leak["colour"], leak["quadrant"]
        console.print(f"leak check (best simple classifier on the teacher's output alone, validation accuracy): "
                      f"this task {100 * c['best']:.1f} % (logistic {100 * c['logistic']:.1f}, "
                      f"mlp {100 * c['mlp']:.1f}; "
                      f"chance {100 * c['chance']:.1f}); the first demo's quadrant task {100 * q['best']:.1f} %")
    job_list = []
    for seed in range(seeds):
        for arm, over in arms.items():
            slug = "".join(ch if ch.isalnum() else "_" for ch in arm.lower())
            # the demo owns its run folders: a re-run starts each of them over (overwrite)
            cfg = _config(over, base_over).replace(seed=seed, out=str(out / f"{slug}_seed{seed}"), quiet=True,
                                                   progress=False)
            job_list.append(((arm, "main"), cfg))
        for arm in low_arms:  # one folder per arm and seed (runs never share one)
            slug = "".join(ch if ch.isalnum() else "_" for ch in arm.lower())
            cfg = _config(ARMS[arm][0], {**base_over, "synthetic_train": LOW_DATA_TRAIN}).replace(
                seed=seed, out=str(out / "low_data" / f"{slug}_seed{seed}"), quiet=True, progress=False)
            job_list.append(((arm, "low"), cfg))
    results = {"main": {a: [] for a in arms}, "low": {a: [] for a in low_arms}}

    def done(key, r):
        arm, setting = key
        results[setting][arm].append(r)
        console.print(f"  {arm:>22}{' (low data)' if setting == 'low' else ''}: val acc "
                      + " ".join(f"{100 * h['val_acc']:.0f}" for h in r["history"]) + f"  ({r['time']:.0f}s)")

    todo, reused = [], 0
    for key, cfg in job_list:
        cfg, finished = _prepare_run(cfg, resume)
        if finished is not None:
            reused += 1
            done(key, finished)
        else:
            todo.append((key, cfg))
    if resume:
        n_cont = sum(c.resume == "auto" for _, c in todo)
        console.print(f"--resume: {reused} finished run(s) reused, {n_cont} continued from their checkpoints, "
                      f"{len(todo) - n_cont} started")
    try:
        _pool_run(todo, n_jobs, threads, shift_n, done)
    except KeyboardInterrupt as e:
        finished = sum(len(v) for r in results.values() for v in r.values())
        raise KeyboardInterrupt(f"interrupted after {finished} of {len(job_list)} runs; finished runs and the "
                                f"others' checkpoints are kept in {out}: continue with the same command plus "
                                "--resume") from e
    ref = "plain ViT"
    summary = {"main": summarize(results["main"], base.epochs, ref)}
    t_main, md_main = _table(summary["main"], arms, base.epochs,
                             f"{base.synthetic_train} training images, mean ± std over {seeds} seed(s); epochs to "
                             f"{100 * summary['main']['target']:.1f} % (90 % of the plain ViT's final accuracy)")
    console.print(t_main)
    md = [md_main]
    headline = None
    if not ablation:
        headline = _headline(summary["main"])
        console.print(f"[bold]headline:[/bold] {headline}")
        md = [f"Leak check: {100 * leak['colour']['best']:.1f} % (chance {100 * leak['colour']['chance']:.1f} %); "
              f"quadrant task {100 * leak['quadrant']['best']:.1f} %", "", md_main, "", f"Headline: {headline}"]
    if low_arms:
        summary["low"] = summarize(results["low"], base.epochs, ref)
        t_low, md_low = _table(summary["low"], low_arms, base.epochs,
                               f"low data: {LOW_DATA_TRAIN} training images, epochs to "
                               f"{100 * summary['low']['target']:.1f} %")
        console.print(t_low)
        md += ["", f"Low data ({LOW_DATA_TRAIN} training images):", "", md_low]
    total = time.time() - t_all
    console.print(f"total time {total:.0f}s ({n_jobs} parallel run(s) x {threads} thread(s))")
    atomic_write_text(out / "table.md", "\n".join(md) + f"\n\nTotal time: {total:.0f}s\n")
    files = [str(plot_curves({a: s["curves"] for a, s in summary["main"].items() if a != "target"},
                             out / "accuracy.png", title="synthetic colour task: validation accuracy"))]
    if low_arms:
        files.append(str(plot_curves({a: s["curves"] for a, s in summary["low"].items() if a != "target"},
                                     out / "accuracy_low_data.png", title=f"low data ({LOW_DATA_TRAIN} images)")))
    if not ablation:
        try:
            files.append(str(_maps_png(results["main"], base, out / "maps.png")))
        except Exception as e:  # plotting must never fail the experiment
            console.print(f"[yellow]maps.png skipped: {type(e).__name__}: {e}[/yellow]")
    res = dict(config=base.to_dict(), seeds=seeds, arms={a: ARMS[a][1] for a in arms if a in ARMS}, leak=leak,
               summary=summary, headline=headline, total_time_s=total, jobs=n_jobs, threads=threads, files=files)
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=str))
    console.print(f"wrote {out / 'table.md'}, {out / 'results.json'}, " + ", ".join(files))
    return res
