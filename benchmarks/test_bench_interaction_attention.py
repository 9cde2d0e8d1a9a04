"""interaction_attention vs eager / SDPA / flex: time and peak memory.

Parametrized (see conftest.py) over shape x impl x {fwd, fwd+bwd} x {maps, no maps}. Each test
warms up (compiles), measures the peak extra memory of one call, then times a few rounds with
``benchmark.pedantic`` (rounds chosen so a test takes about --lfi-target-time seconds).
Everything measured lands in ``benchmark.extra_info`` (and in --benchmark-json output).
"""
from __future__ import annotations

import os

import pytest

from lfi import benchmark as bench


def test_interaction_attention(benchmark, bench_config, impl_name, shape, mode, maps):
    c = bench_config
    impl = bench.get_impl(impl_name)
    ok, reason = impl.available(c.device, c.dtype)
    if not ok:
        pytest.skip(reason)

    benchmark.group = f"{shape.name} {mode} {'maps' if maps else 'no maps'}"
    case = None
    try:
        case = bench.make_case(impl, shape, c.device, c.dtype, mode, maps)
        case.step()  # warm-up: compilation, autotuning, lazy initialization
        t_once = bench.time_once_s(case.step, c.device)
        _, peak = case.measure_peak()
    except Exception as e:
        if case is not None:
            case.release()
        del case
        bench.free_memory(c.device)
        if bench.is_oom(e):
            pytest.skip(f"out of memory: {type(e).__name__}")
        raise

    rounds = int(max(c.min_rounds, min(c.max_rounds, c.target_time / max(t_once, 1e-6))))
    benchmark.extra_info.update(case.info())
    benchmark.extra_info.update(
        peak_mem_bytes=peak,
        peak_mem_mib=None if peak is None else round(peak / 2**20, 2),
        mem_method="cuda max_memory_allocated - allocated before" if c.device.type == "cuda"
        else "peak RSS (VmHWM after clear_refs) - RSS before",
        first_call_s=round(t_once, 6),
        rounds=rounds,
        loadavg_1m=round(os.getloadavg()[0], 2),  # > 1 on an otherwise idle machine = other load
        **{f"version_{k.split()[0]}": v for k, v in c.versions.items()},
    )

    device = c.device

    def run():
        case.step()
        bench.synchronize(device)

    try:
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    finally:
        case.release()
        bench.free_memory(device)
