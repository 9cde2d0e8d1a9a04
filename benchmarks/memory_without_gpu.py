#!/usr/bin/env python
"""Peak memory of one call per implementation, without a GPU: every tensor a call creates is
tracked per storage through torch's dispatcher (``lfi.benchmark.peak_tensor_bytes``), with the
Triton kernels run by the CPU interpreter (they allocate nothing through torch). On a GPU the same
allocations give ``max_memory_allocated`` minus the memory before the call, which is what the
benchmark suite's "peak extra MiB" column reports (checked against the H200's figures in
benchmarks/RESULTS.md). Same cases as the suite: inputs and incoming gradients not counted, the
returned maps and the input gradients counted; fwd+bwd with maps puts a dense gradient on the maps.

    python benchmarks/memory_without_gpu.py [--shape B,H,M,N,D] [--impls eager,lfi_triton] [--dtype bf16]

Prints each peak in MiB and in maps (one (B, H, M, N) map in the dtype). A measurement, not a test.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before lfi (and triton) are imported

import torch  # noqa: E402

from lfi import benchmark as bench  # noqa: E402


def peak_bytes(impl: str, shape, dtype, mode: str, maps: bool) -> int:
    case = bench.make_case(bench.get_impl(impl), shape, torch.device("cpu"), dtype, mode, maps)
    case.step()  # warm-up: lazy initialisation stays out of the count
    for t in (case.q, case.k, case.v):
        t.grad = None
    return bench.peak_tensor_bytes(case.step)[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1,4,197,197,64", help="B,H,M,N,D")
    p.add_argument("--impls", default="eager,lfi_triton")
    p.add_argument("--dtype", default="bf16")
    args = p.parse_args(argv)
    shape = bench.parse_shape(args.shape)
    dtype = bench.parse_dtype(args.dtype)
    map_bytes = shape.B * shape.H * shape.M * shape.N * dtype.itemsize
    print(f"| impl | mode | maps | peak MiB | in maps ({args.shape}, {args.dtype}, one map = "
          f"{map_bytes / 2**20:.2f} MiB) |")
    print("|---|---|---|---:|---:|")
    for impl in args.impls.split(","):
        for mode in bench.MODES:
            for maps in (False, True):
                peak = peak_bytes(impl.strip(), shape, dtype, mode, maps)
                print(f"| {impl} | {mode} | {'yes' if maps else 'no'} | {peak / 2**20:.2f} | {peak / map_bytes:.2f} |")


if __name__ == "__main__":
    main()
