"""Options and parametrization for the interaction_attention benchmarks.

Run:  pytest benchmarks/ --benchmark-only            (CUDA if available, else the reduced CPU set)
      pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
      python benchmarks/summarize.py bench.json        (markdown tables, as in RESULTS.md)

This file deliberately does not touch TRITON_INTERPRET: the Triton interpreter is never timed.
"""
from __future__ import annotations

import pytest
import torch

# lfi is imported lazily (in pytest_configure): importing it probes Triton, and a test conftest
# collected in the same session may still need to set TRITON_INTERPRET before that happens.


def pytest_addoption(parser):
    g = parser.getgroup("lfi", "lfi benchmark options")
    g.addoption("--lfi-device", default="auto", help="cpu, cuda[:i] or auto (cuda when available)")
    g.addoption("--lfi-dtype", default="auto", help="fp32, fp16, bf16 or auto (bf16 on CUDA, fp32 on CPU)")
    g.addoption("--lfi-shapes", default="auto",
                help="auto (full set on CUDA, reduced set on CPU), full, cpu, or a comma list of shape names")
    g.addoption("--lfi-impls", default="all",
                help="all, or a comma list of: eager, sdpa, flex, lfi_torch, lfi_triton, lfi_cuda, lfi_auto")
    g.addoption("--lfi-target-time", type=float, default=None,
                help="approximate seconds of timed rounds per test (default 2 on CPU, 1 on CUDA)")
    g.addoption("--lfi-min-rounds", type=int, default=None, help="default 3 on CPU, 10 on CUDA")
    g.addoption("--lfi-max-rounds", type=int, default=None, help="default 20 on CPU, 200 on CUDA")
    g.addoption("--lfi-threads", type=int, default=None,
                help="torch.set_num_threads for CPU runs (default: torch's default)")


class BenchConfig:
    def __init__(self, config):
        from lfi import benchmark as bench

        dev = config.getoption("--lfi-device")
        self.device = bench.default_device() if dev == "auto" else torch.device(dev)
        dt = config.getoption("--lfi-dtype")
        self.dtype = bench.default_dtype(self.device) if dt == "auto" else bench.parse_dtype(dt)
        which = config.getoption("--lfi-shapes")
        if which in ("auto", "full", "cpu"):
            self.shapes = bench.shapes_for(self.device, which)
        else:
            # names shared by both sets resolve to this device's set ("cpu" on CPU, "full" on CUDA)
            other = bench.SHAPES_CPU if self.device.type == "cuda" else bench.SHAPES_FULL
            by_name = {s.name: s for s in other + bench.shapes_for(self.device)}
            names = [n.strip() for n in which.split(",") if n.strip()]
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise pytest.UsageError(f"--lfi-shapes: unknown shape(s) {unknown}; known: {sorted(by_name)}")
            self.shapes = [by_name[n] for n in names]
        impls = config.getoption("--lfi-impls")
        names = list(bench.IMPLS) if impls == "all" else [n.strip() for n in impls.split(",") if n.strip()]
        try:
            self.impls = [bench.get_impl(n) for n in names]
        except ValueError as e:
            raise pytest.UsageError(f"--lfi-impls: {e}") from None
        cuda = self.device.type == "cuda"
        tt = config.getoption("--lfi-target-time")
        self.target_time = tt if tt is not None else (1.0 if cuda else 2.0)
        mn = config.getoption("--lfi-min-rounds")
        self.min_rounds = mn if mn is not None else (10 if cuda else 3)
        mx = config.getoption("--lfi-max-rounds")
        self.max_rounds = mx if mx is not None else (200 if cuda else 20)
        threads = config.getoption("--lfi-threads")
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.versions = bench.versions()
        self.device_name = bench.device_name(self.device)


def pytest_configure(config):
    config._lfi_bench = BenchConfig(config)


def pytest_report_header(config):
    from lfi import benchmark as bench

    c = config._lfi_bench
    return (f"lfi benchmarks: device={c.device} ({c.device_name}), dtype={bench.dtype_name(c.dtype)}, "
            f"shapes={[s.name for s in c.shapes]}, threads={c.threads}, torch {c.versions['torch']}, "
            f"triton {c.versions['triton']}")


def pytest_generate_tests(metafunc):
    if "impl_name" not in metafunc.fixturenames:
        return
    from lfi import benchmark as bench

    c = metafunc.config._lfi_bench
    params = []
    for shape in c.shapes:
        for impl in c.impls:
            for mode in bench.MODES:
                for maps in (False, True):
                    if maps and not impl.maps:
                        continue  # sdpa / flex cannot return maps: no-maps rows only
                    params.append(pytest.param(
                        impl.name, shape, mode, maps,
                        id=f"{shape.name}-{impl.name}-{mode}-{'maps' if maps else 'nomaps'}"))
    metafunc.parametrize("impl_name,shape,mode,maps", params)


@pytest.fixture(scope="session")
def bench_config(request) -> BenchConfig:
    return request.config._lfi_bench


@pytest.fixture
def run_case(benchmark, bench_config):
    """The measurement every benchmark test makes: ``run_case(make_case, min_rounds=None,
    result_info=None)``. make_case() builds the case (an object with step(), measure_peak() ->
    (result of one step, peak extra bytes or None), info() -> dict and release()); it is warmed up
    once (compilation, autotuning, lazy initialization), one call is timed, the peak extra memory of
    one step is measured, then ``benchmark.pedantic`` times enough rounds for about
    --lfi-target-time seconds, at least min_rounds (default: --lfi-min-rounds's) and at most
    --lfi-max-rounds. benchmark.extra_info records case.info(), result_info(result) (e.g. the loss),
    the memory figures, the rounds, the load average and the versions. Out of memory: skipped."""
    import os

    from lfi import benchmark as bench

    c = bench_config

    def run(make_case, min_rounds=None, result_info=None):
        case = None
        try:
            case = make_case()
            case.step()  # warm-up: compilation, autotuning, lazy initialization
            t_once = bench.time_once_s(case.step, c.device)
            result, peak = case.measure_peak()
            info = result_info(result) if result_info is not None else {}
        except Exception as e:
            if case is not None:
                case.release()
            del case
            bench.free_memory(c.device)
            if bench.is_oom(e):
                pytest.skip(f"out of memory: {type(e).__name__}")
            raise

        low = c.min_rounds if min_rounds is None else min_rounds
        rounds = int(max(low, min(c.max_rounds, c.target_time / max(t_once, 1e-6))))
        benchmark.extra_info.update(case.info())
        benchmark.extra_info.update(
            **info,
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

        def step():
            case.step()
            bench.synchronize(device)

        try:
            benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
        finally:
            case.release()
            bench.free_memory(device)

    return run
