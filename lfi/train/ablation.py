"""Ablations on the built-in synthetic task (the numbers in docs/METHOD.md).

    python -m lfi.train.ablation assignment --out runs/ablation     # fixed vs topk vs hungarian
    python -m lfi.train.ablation readback   --out runs/ablation     # read-back off / cls+queries head (demo: on)
    python -m lfi.train.ablation heads      --out runs/ablation     # broadcast vs head-mean KL
    python -m lfi.train.ablation lam        --out runs/ablation     # interaction-loss weight

Every variant is the demo's run (lfi.train.config.demo_config) with a few fields changed, trained
for the same budget on 3 seeds; the table reports epochs to the target accuracy (median) and the
final accuracy / map@k, as `lfi demo` does.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lfi.train.config import demo_config
from lfi.train.demo import _run_one, epochs_to_target

VARIANTS = {
    "assignment": {
        "fixed": dict(assignment="fixed"),
        "topk": dict(assignment="topk"),
        "hungarian": dict(assignment="hungarian"),
    },
    "readback": {
        "baseline, read-back off": dict(lam=0.0, read_back="off"),
        "LFI, read-back off": dict(read_back="off"),
        "baseline, cls+queries head": dict(lam=0.0, read_back="off", head="cls+queries"),
        "LFI, cls+queries head": dict(read_back="off", head="cls+queries"),
    },
    "heads": {
        "broadcast": dict(heads="broadcast"),
        "mean": dict(heads="mean"),
    },
    "lam": {
        "lam=3": dict(lam=3.0),
        "lam=3, read-back off": dict(lam=3.0, read_back="off"),
    },
}


def run_ablation(name: str, out, seeds: int = 3, jobs: int = 2, target: float = 0.9, variants=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=110)
    variants = variants or VARIANTS[name]
    out = Path(out) / name
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for label, over in variants.items():
        for seed in range(seeds):
            slug = "".join(c if c.isalnum() else "_" for c in label)
            cfg = demo_config(**over).replace(seed=seed, out=str(out / f"{slug}_s{seed}"), quiet=True, save_every=0)
            runs.append((label, seed, cfg))
    curves, maps, times = {v: [] for v in variants}, {v: [] for v in variants}, {v: [] for v in variants}
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        futs = [(label, seed, ex.submit(_run_one, cfg.to_dict(), 1)) for label, seed, cfg in runs]
        for label, seed, f in futs:
            r = f.result()
            accs = [h["val_acc"] for h in r["history"]]
            curves[label].append(accs)
            maps[label].append(r["history"][-1].get("map_score"))
            times[label].append(r["time"])
            console.print(f"  {label} seed {seed}: " + " ".join(f"{100 * a:.0f}" for a in accs) + f" ({r['time']:.0f}s)")
    epochs = runs[0][2].epochs
    table = Table(title=f"ablation: {name} (target {100 * target:.0f}%, {seeds} seeds)")
    for c in ("variant", "epochs to target", "median", "final acc", "map@k", "s/run"):
        table.add_column(c, justify="right")
    md = [f"| {name} | epochs to target (per seed) | median | final acc (mean [min-max]) | map@k | s/run |",
          "|---|---|---:|---:|---:|---:|"]
    summary = {}
    for label in variants:
        ett = [epochs_to_target(c, target) for c in curves[label]]
        vals = [e if e is not None else epochs + 1 for e in ett]
        med = statistics.median(vals)
        finals = [c[-1] for c in curves[label]]
        ms = [m for m in maps[label] if m is not None]
        row = [label, ", ".join(str(e) if e is not None else f">{epochs}" for e in ett),
               f">{epochs}" if med > epochs else f"{med:g}",
               f"{100 * statistics.fmean(finals):.1f} [{100 * min(finals):.1f}-{100 * max(finals):.1f}]",
               f"{statistics.fmean(ms):.3f}" if ms else "-", f"{statistics.fmean(times[label]):.0f}"]
        table.add_row(*row)
        md.append("| " + " | ".join(row) + " |")
        summary[label] = dict(epochs_to_target=ett, median=med, finals=finals, map_scores=ms, curves=curves[label])
    console.print(table)
    total = time.time() - t0
    (out / "table.md").write_text("\n".join(md) + f"\n\nTotal time {total:.0f}s\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lfi.train.ablation")
    p.add_argument("name", choices=sorted(VARIANTS))
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--target", type=float, default=0.9)
    a = p.parse_args(argv)
    run_ablation(a.name, a.out, a.seeds, a.jobs, a.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
