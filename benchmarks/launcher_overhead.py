#!/usr/bin/env python
"""Host time of the Triton attention launchers per call, without a GPU: the kernel launches are
stubbed out (JITFunction.run does nothing), so what is timed is lfi's own Python between the op and
Triton's launch (config choice, buffers, strides, grids). Heuristic configs (LFI_AUTOTUNE=0).

    python benchmarks/launcher_overhead.py [--shape B,H,M,N,D] [--calls 2000] [--repeats 5]

Prints the median and the spread over --repeats timings of --calls calls each, for the forward and
the backward without maps, and the forward with maps (the maps backward copies a map-sized CPU
buffer here, which a GPU does on the device, so it is left out). A measurement, not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("LFI_AUTOTUNE", "0")
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="64,12,197,197,64", help="B,H,M,N,D (bf16)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    JITFunction.run = lambda self, *a, **k: None  # no compilation, no launch
    from lfi.backends.triton import interaction_attention as launcher

    B, H, M, N, D = (int(x) for x in args.shape.split(","))
    q, k, v = (torch.empty(B, H, n, D, dtype=torch.bfloat16) for n in (M, N, N))
    scale = D ** -0.5
    out, stats = launcher.attention_forward(q, k, v, None, scale, False, 0, 0)[:2]
    cases = {
        "forward, no maps": lambda: launcher.attention_forward(q, k, v, None, scale, False, 0, 0),
        "forward, maps": lambda: launcher.attention_forward(q, k, v, None, scale, False, 0, M),
        "backward, no maps": lambda: launcher.attention_backward(out, None, q, k, v, out, stats, None, scale,
                                                                 False, 0, 0, False),
    }
    print(f"| call (B, H, M, N, D = {args.shape}, bf16) | median us | min-max us ({args.repeats} x {args.calls}) |")
    print("|---|---:|---|")
    for name, fn in cases.items():
        for _ in range(50):
            fn()
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            runs.append((time.perf_counter() - t0) / args.calls * 1e6)
        print(f"| {name} | {statistics.median(runs):.1f} | {min(runs):.1f}-{max(runs):.1f} |")


if __name__ == "__main__":
    main()
