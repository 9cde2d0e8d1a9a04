"""`lfi demo`: baseline vs LFI on the built-in synthetic task, same student, same budget, 3 seeds.

Writes to --out: results.json (all curves), table.md (the printed tables as markdown),
accuracy.png (validation accuracy per epoch, mean and min-max over seeds), maps.png (teacher vs
student query maps of the seed-0 LFI and baseline students on validation images) and the seed-0
final checkpoint of every run (<method>_seed<k>/checkpoint.safetensors, usable with `lfi eval` /
`lfi maps`).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from lfi.train.config import demo_config

__all__ = ["run_demo", "epochs_to_target", "summarize"]

QUICK = dict(synthetic_train=480, synthetic_val=200, epochs=3, batch_size=32,
             student_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))


def epochs_to_target(accs, target: float) -> Optional[int]:
    """First epoch (1-based) whose accuracy is >= target, or None."""
    for i, a in enumerate(accs):
        if a is not None and a >= target:
            return i + 1
    return None


def _median_epochs(values, horizon: int):
    """Median where 'not reached' counts as beyond the horizon; -> (value, is_lower_bound)."""
    vals = [v if v is not None else horizon + 1 for v in values]
    med = statistics.median(vals)
    return med, med > horizon


def summarize(curves: dict, target: float, epochs: int) -> dict:
    """curves: {method: [[val acc per epoch] per seed]} -> per-method summary + speedup."""
    out = {}
    for m, runs in curves.items():
        ett = [epochs_to_target(r, target) for r in runs]
        med, lower = _median_epochs(ett, epochs)
        finals = [r[-1] for r in runs]
        out[m] = dict(epochs_to_target=ett, median_epochs=med, not_reached=lower,
                      final_mean=statistics.fmean(finals), final_min=min(finals), final_max=max(finals),
                      best_mean=statistics.fmean(max(r) for r in runs))
    if "baseline" in out and "LFI" in out:
        b, l = out["baseline"], out["LFI"]
        out["speedup"] = b["median_epochs"] / l["median_epochs"]
        out["speedup_is_lower_bound"] = b["not_reached"] and not l["not_reached"]
        out["speedup_undefined"] = l["not_reached"]
    return out


def _tables(curves, summary, target, epochs, extra: dict):
    from rich.markup import escape
    from rich.table import Table

    methods = list(curves)
    t1 = Table(title=escape("validation accuracy per epoch (median over seeds [min-max])"))
    t1.add_column("epoch", justify="right")
    for m in methods:
        t1.add_column(m, justify="right")
    md = ["| epoch | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for e in range(epochs):
        cells = []
        for m in methods:
            vals = [r[e] for r in curves[m] if len(r) > e]
            if len(vals) > 1:
                cells.append(f"{100 * statistics.median(vals):.1f} [{100 * min(vals):.1f}-{100 * max(vals):.1f}]")
            else:
                cells.append(f"{100 * vals[0]:.1f}")
        t1.add_row(str(e + 1), *[escape(c) for c in cells])
        md.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    t2 = Table(title=f"summary (target accuracy {100 * target:.0f}%)")
    for c in ("method", "epochs to target", "median", "final acc", "map@k", "s/run"):
        t2.add_column(c, justify="right")
    md += ["", f"Target accuracy: {100 * target:.0f}%", "",
           "| method | epochs to target (per seed) | median | final acc (mean [min-max]) | map@k | time/run |",
           "|---|---|---:|---:|---:|---:|"]
    for m in methods:
        s = summary[m]
        per = ", ".join(str(v) if v is not None else f">{epochs}" for v in s["epochs_to_target"])
        med = f">{epochs}" if s["not_reached"] else f"{s['median_epochs']:g}"
        fin = f"{100 * s['final_mean']:.1f} [{100 * s['final_min']:.1f}-{100 * s['final_max']:.1f}]"
        mp = extra.get(m, {}).get("map_score")
        mp = f"{mp:.3f}" if mp is not None else "-"
        tm = f"{extra.get(m, {}).get('time', 0):.0f}s"
        t2.add_row(m, per, escape(med), escape(fin), mp, tm)
        md.append(f"| {m} | {per} | {med} | {fin} | {mp} | {tm} |")
    if "speedup" in summary:
        if summary["speedup_undefined"]:
            sp = "LFI did not reach the target (median): speedup undefined"
        else:
            sp = f"{'>=' if summary['speedup_is_lower_bound'] else ''}{summary['speedup']:.2f}x fewer epochs to target (median)"
        md += ["", f"Convergence speedup (baseline / LFI epochs to target): {sp}"]
    else:
        sp = None
    return t1, t2, "\n".join(md), sp


def _run_one(cfg_dict: dict, threads: int) -> dict:
    """One training run (in a worker process or inline) -> history, wall time, checkpoint."""
    from lfi.train.config import TrainConfig
    from lfi.train.trainer import Trainer

    torch.set_num_threads(max(1, threads))
    cfg = TrainConfig.from_dict(cfg_dict)
    t0 = time.time()
    res = Trainer(cfg).run()
    return dict(history=res["history"], time=time.time() - t0, checkpoint=res["checkpoint"])


def _default_jobs() -> int:
    import os

    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def run_demo(out="runs/demo", *, quick: bool = False, seeds: int = 3, epochs: Optional[int] = None,
             target: Optional[float] = None, threads: Optional[int] = None, jobs: Optional[int] = None, console=None,
             methods=("baseline", "LFI"), **overrides) -> dict:
    """Trains the baseline (lam=0) and LFI (lam>0) for the same budget over `seeds` seeds.

    Runs go to `jobs` worker processes (default: min(2, CPU cores)) with `threads` torch threads
    each (default: cores // jobs): small models train faster as parallel single-threaded runs.
    """
    import os
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=110)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = demo_config(**(QUICK if quick else {}))
    if quick:
        seeds = 1
    if epochs is not None:
        base = base.replace(epochs=int(epochs))
    base = base.replace(**overrides)
    target = (0.5 if quick else 0.9) if target is None else float(target)
    lam_lfi = base.lam if base.lam > 0 else 1.0
    runs = []
    for seed in range(seeds):
        for m in methods:
            lam = 0.0 if m == "baseline" else lam_lfi
            cfg = base.replace(seed=seed, lam=lam, out=str(out / f"{m.lower()}_seed{seed}"),
                               save_every=base.epochs, quiet=True, progress=False)
            runs.append((m, seed, cfg))
    jobs = _default_jobs() if jobs is None else max(1, int(jobs))
    jobs = min(jobs, len(runs))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // jobs) if threads is None else int(threads)
    console.print(f"[bold]lfi demo[/bold]{' --quick' if quick else ''}: {len(methods)} methods x {seeds} seeds, "
                  f"{base.epochs} epochs, {base.synthetic_train} train / {base.synthetic_val} val synthetic images, "
                  f"student {base.student} {base.student_kwargs}, K={base.queries} queries, read_back={base.read_back}, "
                  f"assignment={base.assignment}; {jobs} parallel run(s) x {threads} thread(s)")
    curves = {m: [None] * seeds for m in methods}
    extra = {m: {"time": 0.0, "map_scores": []} for m in methods}
    ckpts = {}
    t_all = time.time()

    def collect(m, seed, r):
        accs = [h.get("val_acc") for h in r["history"]]
        curves[m][seed] = accs
        extra[m]["time"] += r["time"] / seeds
        last = r["history"][-1]
        if last.get("map_score") is not None:
            extra[m]["map_scores"].append(last["map_score"])
        if r.get("checkpoint") and seed == 0:
            ckpts[m] = r["checkpoint"]
        console.print(f"  {m:>8} seed {seed}: val acc " + " ".join(f"{100 * a:.0f}" for a in accs)
                      + f"  ({r['time']:.0f}s)")

    pending = list(runs)
    if jobs > 1:
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
                futs = [(m, seed, cfg, ex.submit(_run_one, cfg.to_dict(), threads)) for m, seed, cfg in runs]
                for m, seed, cfg, f in futs:
                    collect(m, seed, f.result())
                    pending.remove((m, seed, cfg))
        except BrokenProcessPool:  # a worker was killed from outside: finish the remaining runs here
            console.print(f"[yellow]a worker process died; running the {len(pending)} remaining run(s) in this "
                          "process[/yellow]")
    for m, seed, cfg in pending:
        collect(m, seed, _run_one(cfg.to_dict(), max(1, cores if jobs > 1 else threads)))
    for m in methods:
        ms = extra[m].pop("map_scores")
        extra[m]["map_score"] = statistics.fmean(ms) if ms else None
    summary = summarize(curves, target, base.epochs)
    t1, t2, md, sp = _tables(curves, summary, target, base.epochs, extra)
    console.print(t1)
    console.print(t2)
    if sp:
        console.print(f"[bold]convergence speedup:[/bold] {sp}")
    total = time.time() - t_all
    console.print(f"total time {total:.0f}s ({jobs} parallel run(s) x {threads} thread(s))")
    (out / "table.md").write_text(md + f"\n\nTotal time: {total:.0f}s ({jobs} parallel runs x {threads} threads)\n",
                                  encoding="utf-8")

    from lfi.train.visualize import plot_curves

    plot_curves(curves, out / "accuracy.png", target=target,
                title="synthetic task: validation accuracy (baseline vs LFI)")
    files = [str(out / "accuracy.png")]
    try:
        files.append(str(_maps_png(ckpts, base, out / "maps.png")))
    except Exception as e:  # plotting must never fail the demo
        console.print(f"[yellow]maps.png skipped: {type(e).__name__}: {e}[/yellow]")
    results = dict(config=base.to_dict(), target=target, curves=curves, summary=summary, extra=extra,
                   total_time_s=total, jobs=jobs, threads=threads, checkpoints=ckpts, files=files)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    console.print(f"wrote {out / 'table.md'}, {out / 'results.json'}, " + ", ".join(files)
                  + (f"; LFI checkpoint {ckpts['LFI']}" if "LFI" in ckpts else ""))
    return results


def _maps_png(ckpts: dict, cfg, path, n_images: int = 3):
    from lfi.nn.interaction_loss import InteractionLoss
    from lfi.teachers import SyntheticTeacher
    from lfi.train.checkpoint import load_student
    from lfi.train.maps import _column_titles, collect_maps
    from lfi.train.trainer import synthetic_datasets
    from lfi.train.visualize import plot_maps

    _, val = synthetic_datasets(cfg)
    imgs01, _, masks = val.tensors()
    imgs01, masks = imgs01[:n_images], masks[:n_images]
    collected = {}
    for m in ("LFI", "baseline"):
        if m not in ckpts:
            continue
        student, meta = load_student(ckpts[m])
        mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
        teacher = SyntheticTeacher(meta["concepts"], student.grid, sigma=cfg.synthetic_sigma)
        collected[m] = collect_maps(student, (imgs01 - mean) / std, teacher=teacher, masks=masks,
                                    loss_fn=InteractionLoss(assignment=cfg.assignment))
    rows, pics = [], []
    first = next(iter(collected.values()))
    for b in range(n_images):
        pics.append(imgs01[b].permute(1, 2, 0).numpy())
        r = [("teacher (GT)", first["teacher"][b].numpy())]
        for m, c in collected.items():
            for li in sorted({0, len(c["layers"]) - 1}):
                r.append((f"{m} L{c['layers'][li]}", c["student"][b, li].numpy()))
        rows.append(r)
    return plot_maps(pics, rows, path, col_titles=_column_titles(first["labels"]),
                     title="query maps (head mean) vs the synthetic teacher (baseline: queries not supervised)")
