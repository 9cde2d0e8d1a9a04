#!/usr/bin/env python
"""Where the time of one call goes on a GPU: device time per kernel against the call's wall time.

    python benchmarks/gpu_profile.py [--shapes vit_b_n197,xattn_m16_n197] [--impls sdpa,lfi_triton] [--steps 20]
                                     [--direct-launch 0|1]

For each implementation x mode (fwd, fwd+bwd) x maps (off, on), after a warm-up (compilation,
autotuning), it times --steps steps with CUDA events (wall per step, the launches included) and
profiles the same steps with torch.profiler: the sum of the device kernels' time per step and the
top kernels. Wall minus kernel time is what the host and the gaps between launches cost: at ViT
shapes a few kernels of tens of microseconds each, so a launch path of 100 us shows directly.
--direct-launch 0 sends every Triton launch through Triton's JITFunction.run (TunedKernel.fast_launch
= False), to time what the direct launches save.
Markdown out (benchmarks/gpu_check.sh puts it in its summary). A measurement, not a test.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lfi import benchmark as bench


def _kernel_rows(prof, steps: int, top: int = 4):
    """(total device us per step, [(kernel name, us per step)] of the `top` longest). A kernel's row
    in key_averages() holds its own device time (self_device_time_total); an operator's row holds
    none of its own (its kernels' time is their rows'), so the sum over rows counts each kernel once."""
    rows = [(evt.key, evt.self_device_time_total) for evt in prof.key_averages() if evt.self_device_time_total > 0]
    total = sum(us for _, us in rows) / steps
    rows.sort(key=lambda kv: -kv[1])
    return total, [(name[:60], us / steps) for name, us in rows[:top]]


def profile_case(impl_name: str, shape, mode: str, maps: bool, steps: int, dtype) -> str:
    impl = bench.get_impl(impl_name)
    ok, reason = impl.available(torch.device("cuda"), dtype)
    if not ok or (maps and not impl.maps):
        return ""
    case = bench.make_case(impl, shape, torch.device("cuda"), dtype, mode, maps)
    try:
        for _ in range(3):
            case.step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            case.step()
        end.record()
        torch.cuda.synchronize()
        wall_us = start.elapsed_time(end) * 1e3 / steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                case.step()
            torch.cuda.synchronize()
        kernel_us, top = _kernel_rows(prof, steps)
    finally:
        case.release()
        bench.free_memory(torch.device("cuda"))
    tops = "; ".join(f"{name} {us:.1f}" for name, us in top)
    return (f"| {impl_name} | {mode} | {'yes' if maps else 'no'} | {wall_us:.1f} | {kernel_us:.1f} | "
            f"{wall_us - kernel_us:.1f} | {tops} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="vit_b_n197", help="shape names of lfi.benchmark.SHAPES_FULL, comma-separated")
    p.add_argument("--impls", default="sdpa,eager,lfi_triton,lfi_auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--direct-launch", default="1", choices=["0", "1"],
                   help="0: every Triton launch through JITFunction.run")
    args = p.parse_args(argv)
    from lfi.backends.triton._launch import TunedKernel
    TunedKernel.fast_launch = args.direct_launch == "1"
    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile.py needs a CUDA device")
    shapes = {s.name: s for s in bench.SHAPES_FULL}
    dtype = bench.parse_dtype(args.dtype)
    for name in args.shapes.split(","):
        shape = shapes[name.strip()]
        print(f"### {shape.name} ({bench.device_name(torch.device('cuda'))}, {args.dtype}, {args.steps} steps, "
              f"direct launches {args.direct_launch})\n")
        print("| impl | mode | maps | wall us/step | kernels us/step | wall - kernels | longest kernels (us/step) |")
        print("|---|---|---|---:|---:|---:|---|")
        for impl in args.impls.split(","):
            for mode in bench.MODES:
                for maps in (False, True):
                    row = profile_case(impl.strip(), shape, mode, maps, args.steps, dtype)
                    if row:
                        print(row, flush=True)
        print()


if __name__ == "__main__":
    main()
