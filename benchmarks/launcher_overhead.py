#!/usr/bin/env python
"""Host time per call of the Triton path, without a GPU. Two measurements:

- ``launcher``: lfi's launchers alone (lfi.backends.triton.interaction_attention), with
  JITFunction.run stubbed out: config choice, buffers, strides, grids.
- ``call``: the whole call as a user makes it, ``interaction_attention(q, k, v, backend="triton")``
  (validation, dispatch, the autograd layer, the launchers, TunedKernel, Triton's autotuner and
  JITFunction.run with its argument binding and specialization, or for a launch seen before
  TunedKernel's direct launch of the compiled kernel; `--direct-launch 0`: every launch through
  JITFunction.run), with only what needs a GPU faked:
  Triton's driver reports an sm_90 device, compilation returns a kernel whose launch does nothing,
  and autotuning's timings are constant (so it picks the first candidate). Forward under no_grad
  and forward + backward: without maps (``torch.autograd.grad`` of q, k, v), with every row's maps
  (``backward()`` of a loss on out and the maps, as the benchmark suite's cases) and with the fused
  KL against a (B, 1, M, N) target (a loss on out and the KL); and attention_kl_qk's forward +
  backward against that target, as InteractionLoss computes it per supervised layer.

    python benchmarks/launcher_overhead.py [--what call|launcher] [--shape B,H,M,N,D] [--calls N]
                                           [--repeats 5] [--autotune 0|1] [--direct-launch 0|1]

Tensors are CPU tensors that are never touched (torch.empty), so what is timed is host work; a
GPU adds the driver's launch (a few us per kernel) and the CUDA caching allocator instead of
malloc. Prints the median and the spread over --repeats timings of --calls calls each. A
measurement, not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from kernel_report import FakeDriver  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _NoLaunchKernel:
    """What the faked compilation returns: JITFunction.run's launch of it does nothing."""

    function = packed_metadata = None

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        return None


def _compile_nothing(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = _NoLaunchKernel()
    self.device_caches[device][0][key] = kernel  # cached as a compiled kernel is
    return kernel


def _timed(fn, calls: int, repeats: int) -> list[float]:
    for _ in range(min(50, calls)):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return runs


def launcher_cases(q, k, v, M):
    JITFunction.run = lambda self, *a, **k: None  # no compilation, no launch
    from lfi.backends.triton import interaction_attention as launcher

    scale = q.shape[-1] ** -0.5
    out, stats = launcher.attention_forward(q, k, v, None, scale, False, 0, 0)[:2]
    return {
        "launcher: forward, no maps": lambda: launcher.attention_forward(q, k, v, None, scale, False, 0, 0),
        "launcher: forward, maps": lambda: launcher.attention_forward(q, k, v, None, scale, False, 0, M),
        "launcher: backward, no maps": lambda: launcher.attention_backward(
            out, None, q, k, v, out, stats, None, scale, False, 0, 0, False),
    }


def call_cases(q, k, v, M):
    JITFunction._do_compile = _compile_nothing
    from lfi import _dispatch

    usable = _dispatch._unusable_reason  # the Triton backend refuses CPU tensors outside the interpreter
    _dispatch._unusable_reason = lambda backend, device: None if backend == "triton" else usable(backend, device)
    import lfi.ops._kl
    from lfi.ops import attention_kl_qk, interaction_attention

    lfi.ops._kl.checks_values_free = lambda t: False  # target values unchecked, as on a GPU

    q, k, v = (t.requires_grad_() for t in (q, k, v))
    B, H, _, N = *q.shape[:3], k.shape[2]
    grad = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    grad_maps = torch.empty(B, H, M, N, dtype=q.dtype)
    target = torch.empty(B, 1, M, N, dtype=q.dtype)  # a teacher's maps, shared by the heads

    def forward():
        with torch.no_grad():
            interaction_attention(q, k, v, backend="triton")

    def forward_backward():
        torch.autograd.grad(interaction_attention(q, k, v, backend="triton"), (q, k, v), grad)

    def forward_maps():
        with torch.no_grad():
            interaction_attention(q, k, v, need_weights=True, backend="triton")

    def forward_backward_maps():
        # As the benchmark suite's cases: a loss on out and on the maps, backward() into .grad
        # (reset, so that accumulating them is not CPU work the GPU would not do).
        q.grad = k.grad = v.grad = None
        torch.autograd.backward(interaction_attention(q, k, v, need_weights=True, backend="triton"),
                                (grad, grad_maps))

    def forward_backward_kl():
        q.grad = k.grad = v.grad = None
        out, kl = interaction_attention(q, k, v, kl_target=target, backend="triton")
        torch.autograd.backward((out, kl), (grad, torch.ones((), dtype=kl.dtype)))

    def forward_backward_kl_qk():  # InteractionLoss's call per supervised layer (via="qk")
        q.grad = k.grad = None
        attention_kl_qk(q, k, target, backend="triton").backward()

    return {
        "call: forward, no maps": forward,
        "call: forward + backward, no maps": forward_backward,
        "call: forward, maps": forward_maps,
        "call: forward + backward, maps (loss on out and maps)": forward_backward_maps,
        "call: forward + backward, fused KL (loss on out and KL)": forward_backward_kl,
        "call: attention_kl_qk(q, k, target), forward + backward": forward_backward_kl_qk,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="call", choices=["call", "launcher"],
                   help="the whole call, or the launchers alone (Triton is stubbed differently for each)")
    p.add_argument("--shape", default="64,12,197,197,64", help="B,H,M,N,D (bf16)")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--autotune", default="1", choices=["0", "1"], help="LFI_AUTOTUNE (1: the default)")
    p.add_argument("--direct-launch", default="1", choices=["0", "1"],
                   help="0: every launch through Triton's JITFunction.run (TunedKernel.fast_launch = False)")
    args = p.parse_args(argv)
    os.environ["LFI_AUTOTUNE"] = args.autotune
    driver.set_active(FakeDriver())
    from lfi.backends.triton._launch import TunedKernel
    TunedKernel.fast_launch = args.direct_launch == "1"
    B, H, M, N, D = (int(x) for x in args.shape.split(","))
    q, k, v = (torch.empty(B, H, n, D, dtype=torch.bfloat16) for n in (M, N, N))
    cases = launcher_cases(q, k, v, M) if args.what == "launcher" else call_cases(q, k, v, M)
    print(f"| host time per call (B, H, M, N, D = {args.shape}, bf16, LFI_AUTOTUNE={args.autotune}, "
          f"direct launches {args.direct_launch}) "
          f"| median us | min-max us ({args.repeats} x {args.calls}) |")
    print("|---|---:|---|")
    for name, fn in cases.items():
        runs = _timed(fn, args.calls, args.repeats)
        print(f"| {name} | {statistics.median(runs):.1f} | {min(runs):.1f}-{max(runs):.1f} |")


if __name__ == "__main__":
    main()
