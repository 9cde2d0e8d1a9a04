"""Benchmark harness shared by ``lfi bench`` (lfi/cli.py) and the pytest-benchmark suite in
``benchmarks/``. It measures the library; the library never imports it (tests/test_layering.py).

Everything here is plain PyTorch; ``lfi.ops`` is imported lazily so that the baselines still run
when the op (or one of its backends) is broken. One module per concern:

* ``lfi.benchmark.env``: default device / dtype, dtype and device names, versions, synchronize
* ``lfi.benchmark.impls``: the competing implementations (eager, sdpa, flex, lfi_*; see its
  docstring) and whether each can run here (``Impl.available``)
* ``lfi.benchmark.shapes``: the shape sets (full on CUDA, reduced on CPU) and ``B,H,M,N,D`` parsing
* ``lfi.benchmark.measure``: peak memory and timing of one call, memory housekeeping
* ``lfi.benchmark.cases``: a ``Case`` (inputs + a zero-argument step) per (impl, shape, mode, maps)
* ``lfi.benchmark.compare``: the side-by-side table of ``lfi bench``
* ``lfi.benchmark.output``: ``lfi bench --json``'s file, checked before the run and written atomically

The names below are re-exported here, so ``from lfi import benchmark as bench; bench.make_case(...)``
works without knowing the module layout.
"""
from lfi.benchmark.cases import MODES, Case, make_case
from lfi.benchmark.compare import max_abs_diff, run_comparison
from lfi.benchmark.env import (
    cpu_model,
    default_device,
    default_dtype,
    device_name,
    dtype_name,
    parse_dtype,
    synchronize,
    versions,
)
from lfi.benchmark.impls import IMPLS, Impl, cuda_ext_needs_build, get_impl
from lfi.benchmark.measure import (
    TensorMemory,
    fmt_bytes,
    free_memory,
    is_oom,
    measure_peak_memory,
    peak_tensor_bytes,
    time_ms,
    time_once_s,
)
from lfi.benchmark.output import check_output_file, write_json_atomic
from lfi.benchmark.shapes import SHAPES_CPU, SHAPES_FULL, Shape, parse_shape, shapes_for

__all__ = [
    "Impl",
    "TensorMemory",
    "IMPLS",
    "Shape",
    "SHAPES_FULL",
    "SHAPES_CPU",
    "Case",
    "MODES",
    "check_output_file",
    "cpu_model",
    "cuda_ext_needs_build",
    "default_device",
    "default_dtype",
    "device_name",
    "dtype_name",
    "fmt_bytes",
    "free_memory",
    "get_impl",
    "is_oom",
    "make_case",
    "max_abs_diff",
    "measure_peak_memory",
    "parse_dtype",
    "parse_shape",
    "peak_tensor_bytes",
    "run_comparison",
    "shapes_for",
    "synchronize",
    "time_ms",
    "time_once_s",
    "versions",
    "write_json_atomic",
]
