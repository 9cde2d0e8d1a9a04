"""interaction_attention vs eager / SDPA / flex: time and peak memory.

Parametrized (see conftest.py) over shape x impl x {fwd, fwd+bwd} x {maps, no maps}. Each test
warms up (compiles), measures the peak extra memory of one call, then times a few rounds with
``benchmark.pedantic`` (rounds chosen so a test takes about --lfi-target-time seconds; conftest's
``run_case``). Everything measured lands in ``benchmark.extra_info`` (and in --benchmark-json output).
"""
from __future__ import annotations

import pytest

from lfi import benchmark as bench


def test_interaction_attention(benchmark, bench_config, run_case, impl_name, shape, mode, maps):
    c = bench_config
    impl = bench.get_impl(impl_name)
    ok, reason = impl.available(c.device, c.dtype)
    if not ok:
        pytest.skip(reason)

    benchmark.group = f"{shape.name} {mode} {'maps' if maps else 'no maps'}"
    run_case(lambda: bench.make_case(impl, shape, c.device, c.dtype, mode, maps))
