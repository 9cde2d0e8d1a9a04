"""The ``lfi`` console script: ``lfi info`` and ``lfi bench``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from lfi._command import run_command


def _console():
    from rich.console import Console

    return Console()


# --------------------------------------------------------------------------------------------
# lfi info
# --------------------------------------------------------------------------------------------
def _devices_to_report(requested: str | None) -> list[str]:
    import torch

    if requested:
        return [requested]
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.insert(0, "cuda")
    return devs


def cmd_info(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from lfi import benchmark as bench

    console = _console()
    vers = bench.versions()
    t = Table(title="lfi environment", show_header=False)
    t.add_column("item", style="bold")
    t.add_column("value")
    for key in ("lfi", "torch", "triton", "python", "cuda (torch build)"):
        t.add_row(key, vers.get(key, "?"))
    t.add_row("CUDA available", str(torch.cuda.is_available()))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            t.add_row(f"cuda:{i}", bench.device_name(f"cuda:{i}"))
    t.add_row("CPU", bench.device_name("cpu"))
    for var in ("LFI_BACKEND", "TRITON_INTERPRET"):
        t.add_row(f"${var}", os.environ.get(var, "(unset)"))
    console.print(t)

    try:
        from lfi._dispatch import backend_status
    except Exception as e:
        console.print(f"[red]cannot import lfi._dispatch.backend_status: {type(e).__name__}: {e}[/red]")
        return 1
    try:
        from lfi._dispatch import auto_choice
    except Exception:
        auto_choice = None

    rc = 0
    for dev in _devices_to_report(args.device):
        device = torch.device(dev)
        bt = Table(title=f"backends on {dev}: {bench.device_name(device)}")
        bt.add_column("backend", style="bold")
        bt.add_column("usable")
        bt.add_column("reason")
        try:
            status = backend_status(device)
        except Exception as e:
            console.print(f"[red]backend_status({dev!r}) failed: {type(e).__name__}: {e}[/red]")
            rc = 1
            continue
        for name, (ok, reason) in status.items():
            bt.add_row(name, "[green]yes[/green]" if ok else "[red]no[/red]", reason)
        if auto_choice is not None:
            try:
                picked, why = auto_choice(device)
                picked = f"{picked} ({why})"
            except Exception as e:
                picked = f"error: {e}"
            bt.caption = (f'backend="auto" runs: {picked}; calls SDPA computes identically (no maps, no KL) go to '
                          "F.scaled_dot_product_attention (README: backends)")
        console.print(bt)

    try:
        from lfi.backends.cuda import _ext

        info = _ext.extension_info()  # never builds
    except Exception:
        info = None
    if info:
        et = Table(title='lfi_C extension (backend="cuda")', show_header=False)
        et.add_column("item", style="bold")
        et.add_column("value")
        labels = [("built", "loaded in this process"), ("aot_path", "ahead-of-time build"),
                  ("jit_cache", "JIT build cache"), ("cuda", "has CUDA kernels"), ("archs", "archs"),
                  ("nvcc", "CUDA toolkit (nvcc)"), ("build_problem", "cannot build because"),
                  ("error", "error")]
        for key, label in labels:
            val = info.get(key)
            if key in ("cuda", "archs") and not info.get("built"):
                continue
            if key in ("build_problem", "error") and not val:
                continue
            et.add_row(label, "-" if val in (None, "", []) else str(val))
        console.print(et)
    return rc


# --------------------------------------------------------------------------------------------
# lfi bench
# --------------------------------------------------------------------------------------------
_CPU_DEFAULT_SHAPE = "2,6,577,577,64"
_CUDA_DEFAULT_SHAPE = "16,12,1025,1025,64"


def _ratio(num, den) -> str:
    if num is None or den is None or den == 0:
        return "-"
    return f"{num / den:.2f}x"


def render_bench(rows, title: str, caption: str):
    """(table, notes): skipped combinations and error messages go to the notes, not the table."""
    from rich import box
    from rich.table import Table

    from lfi import benchmark as bench

    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    t.add_column("impl", style="bold", no_wrap=True)
    t.add_column("mode", no_wrap=True)
    t.add_column("maps", no_wrap=True)
    for col in ("ms", "speedup", "peak mem", "mem ratio", "max err"):  # ratios: vs eager
        t.add_column(col, justify="right", no_wrap=True)
    eager = {(r["mode"], r["maps"]): r for r in rows if r["impl"] == "eager"}
    notes: list[str] = []
    skipped: dict[str, str] = {}
    last_group = None
    for r in rows:
        if r["skipped"]:
            skipped.setdefault(r["label"], r["skipped"])
            continue
        group = (r["mode"], r["maps"])
        if last_group is not None and group != last_group:
            t.add_section()
        last_group = group
        maps = "yes" if r["maps"] else "no"
        if r["error"]:
            notes.append(f"[red]\\[{len(notes) + 1}] {r['label']} {r['mode']} maps={maps}: {r['error']}[/red]")
            t.add_row(r["label"], r["mode"], maps, f"[red]error \\[{len(notes)}][/red]", "", "", "", "")
            continue
        e = eager.get(group, {})
        is_ref = r["impl"] == "eager"
        speed = "1.00x" if is_ref else _ratio(e.get("median_ms"), r["median_ms"])
        mem = "1.00x" if is_ref else _ratio(r["peak_bytes"], e.get("peak_bytes"))
        err = "ref" if is_ref else ("-" if r["max_err"] is None else f"{r['max_err']:.1e}")
        t.add_row(r["label"], r["mode"], maps, f"{r['median_ms']:.2f}", speed,
                  bench.fmt_bytes(r["peak_bytes"]), mem, err)
    for label, reason in skipped.items():
        notes.append(f"[dim]not run: {label}: {reason}[/dim]")
    return t, notes


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from lfi import benchmark as bench

    console = _console()
    if args.json:  # a bad --json path fails now, not after the run
        bench.check_output_file(args.json, args.overwrite)
    device = torch.device(args.device) if args.device else bench.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda requested but CUDA is not available[/red]")
        return 2
    dtype = args.dtype or bench.default_dtype(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = args.shape or bench.parse_shape(_CUDA_DEFAULT_SHAPE if device.type == "cuda" else _CPU_DEFAULT_SHAPE)
    impls = list(args.impls or bench.IMPLS)
    if "eager" not in impls:
        impls.insert(0, "eager")
    modes = {"fwd": ["fwd"], "fwd+bwd": ["fwd+bwd"], "both": list(bench.MODES)}[args.mode]
    min_time = args.min_time if args.min_time is not None else (0.3 if device.type == "cuda" else 0.5)

    vers = bench.versions()
    title = (f"interaction_attention  {shape}  {bench.dtype_name(dtype)}  on "
             f"{bench.device_name(device)}")
    caption = (f"torch {vers['torch']}, triton {vers['triton']}, lfi {vers['lfi']}. "
               f"ms: median (torch.utils.benchmark, >= {min_time}s per row). speedup: eager ms / ms. "
               "peak mem: extra memory over the inputs at the peak of one call ("
               + ("CUDA max_memory_allocated" if device.type == "cuda" else "process peak-RSS delta")
               + f"); one (B,H,M,N) map = {bench.fmt_bytes(shape.map_bytes(dtype))}. "
               "mem ratio: peak mem / eager's. max err: max |difference| to eager of out and maps (fwd) "
               "or dq, dk, dv (fwd+bwd).")
    with console.status("benchmarking...") as status:
        rows = bench.run_comparison(shape, device, dtype, impls, modes, min_time, check=not args.no_check,
                                    verbose=args.verbose, progress=lambda s: status.update(f"benchmarking {s}"),
                                    allow_build=args.build_ext)
    table, notes = render_bench(rows, title, caption)
    console.print(table)
    for line in notes:
        console.print(line)
    if args.json:
        payload = {"shape": shape.as_tuple(), "dtype": bench.dtype_name(dtype), "device": str(device),
                   "device_name": bench.device_name(device), "versions": vers, "rows": rows}
        bench.write_json_atomic(args.json, payload, indent=2)
        console.print(f"wrote {args.json}")
    ran = [r for r in rows if not r["skipped"]]
    return 1 if ran and all(r["error"] for r in ran) else 0


# --------------------------------------------------------------------------------------------
def _arg_type(parse, what: str):
    """An argparse type from a parser that raises ValueError: its message becomes argparse's
    one-line usage error (exit status 2), naming the flag."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = what  # argparse names the type in "invalid <name> value" messages
    return convert


def _positive(kind):
    what = "an integer" if kind is int else "a finite number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):  # also refuses nan
            raise ValueError(f"expected {what} > 0, got {text!r}")
        return value

    return parse


def _impl_list(text: str) -> list:
    from lfi.benchmark import IMPLS

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError(f"expected a comma-separated list of {', '.join(IMPLS)}, got {text!r}")
    for name in names:
        if name not in IMPLS:
            raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    return names


def _shape_arg(text: str):
    from lfi.benchmark import parse_shape

    return parse_shape(text)


def _dtype_arg(text: str):
    from lfi.benchmark import parse_dtype

    return parse_dtype(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfi", description="LFI: attention with exact, differentiable maps.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pi = sub.add_parser("info", help="versions, device and which backends are usable (and why not)")
    pi.add_argument("--device", default=None, help="report backends for this device only (cpu, cuda, cuda:1)")
    pi.set_defaults(func=cmd_info)

    pb = sub.add_parser("bench", help="side-by-side timing and peak memory of the op vs eager/SDPA/flex")
    pb.add_argument("--shape", default=None, type=_arg_type(_shape_arg, "shape"),
                    help=f"B,H,M,N,D (or B,H,N,D); default {_CPU_DEFAULT_SHAPE} on CPU, "
                         f"{_CUDA_DEFAULT_SHAPE} on CUDA")
    pb.add_argument("--dtype", default=None, type=_arg_type(_dtype_arg, "dtype"),
                    help="fp32, fp16 or bf16; default bf16 on CUDA, fp32 on CPU")
    pb.add_argument("--device", default=None, help="cpu or cuda; default cuda when available")
    pb.add_argument("--impls", default=None, type=_arg_type(_impl_list, "implementation list"),
                    help="comma-separated subset of: eager,sdpa,flex,lfi_torch,lfi_triton,lfi_cuda,lfi_auto "
                         "(default all)")
    pb.add_argument("--build-ext", action="store_true",
                    help="let lfi_cuda compile the lfi_C extension if it is not built yet (minutes); "
                         "without it an unbuilt extension is skipped")
    pb.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both",
                    help="forward only, forward+backward, or both (default)")
    pb.add_argument("--min-time", type=_arg_type(_positive(float), "seconds"), default=None,
                    help="seconds of timing per row (default 0.5 on CPU, 0.3 on CUDA)")
    pb.add_argument("--threads", type=_arg_type(_positive(int), "thread count"), default=None,
                    help="torch.set_num_threads (CPU); default torch's")
    pb.add_argument("--no-check", action="store_true", help="skip the max |err| comparison against eager")
    pb.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON (its folder must exist)")
    pb.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    pb.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing rows")
    pb.set_defaults(func=cmd_bench)

    # demo / train / eval / maps from the training layer; `lfi info` and `lfi bench` keep working
    # if it cannot be imported
    try:
        from lfi.train.cli import add_subcommands
    except Exception:
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, errors=(ValueError, RuntimeError))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
