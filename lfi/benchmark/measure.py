"""Peak memory and timing of one call, and memory housekeeping between benchmark cases."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lfi.benchmark.env import synchronize

__all__ = ["TensorMemory", "measure_peak_memory", "peak_tensor_bytes", "time_ms", "time_once_s", "free_memory",
           "is_oom", "fmt_bytes"]

_LIBC = None


def _malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so RSS peaks are not hidden by reuse."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except Exception:
            _LIBC = False
    if _LIBC:
        try:
            _LIBC.malloc_trim(0)
        except Exception:
            pass


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, int | None]:
    """Run ``fn()`` once; return (its result, peak extra bytes during the call).

    CUDA: ``max_memory_allocated`` minus what was allocated before (the inputs), i.e. the extra
    memory the call needed at its peak. CPU: process peak RSS (``VmHWM`` after resetting it by
    writing "5" to /proc/self/clear_refs) minus the RSS before the call; ``None`` when the kernel
    does not support that. The CPU number is coarser (page granularity, includes allocator slack).
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - base)
    if device.type == "cpu":
        _malloc_trim()
        if not _reset_rss_peak():
            return fn(), None
        before = _proc_status_kb("VmRSS")
        result = fn()
        peak = _proc_status_kb("VmHWM")
        if before is None or peak is None:
            return result, None
        return result, max(0, peak - before) * 1024
    return fn(), None


class TensorMemory(TorchDispatchMode):
    """While active, tracks the memory of the tensors that the ops torch dispatches create, on any
    device: a storage counts from the op that creates it (an output not aliasing the op's inputs)
    until the last tensor seen on it is freed. ``peak``: the most bytes live at once, what
    ``max_memory_allocated`` minus the memory before measures on a GPU (without the caching
    allocator's rounding), also where no GPU is (Triton kernels under the CPU interpreter allocate
    nothing through torch); ``allocations``: (op name, dtype, bytes) of each storage created.
    It only observes: lfi's ops run their plain eager path under it (``observes_only``), the one
    an unobserved call takes."""

    observes_only = True

    def __init__(self):
        super().__init__()
        self.tensors, self.nbytes = {}, {}  # storage pointer -> live tensors seen on it, its size
        self.live = self.peak = 0
        self.allocations = []

    def _release(self, ptr):
        self.tensors[ptr] -= 1
        if not self.tensors[ptr]:
            self.live -= self.nbytes.pop(ptr)
            del self.tensors[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.tensors:
                if inputs is None:
                    inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                              if isinstance(a, torch.Tensor)}
                if not ptr or ptr in inputs:  # a view or in-place result of memory made before
                    continue
                self.tensors[ptr], self.nbytes[ptr] = 0, storage.nbytes()
                self.allocations.append((func.__name__, t.dtype, storage.nbytes()))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.tensors[ptr] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def peak_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` once; return (its result, the peak bytes of the tensors it created: see
    TensorMemory)."""
    with TensorMemory() as memory:
        result = fn()
    return result, memory.peak


def time_ms(fn: Callable[[], Any], min_run_time: float = 0.3) -> dict[str, float]:
    """Median / IQR in milliseconds using ``torch.utils.benchmark.Timer`` (synchronizes CUDA)."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3, "runs": float(len(m.times))}


def time_once_s(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Wall-clock seconds of one synchronized call (sizes the rounds of the pytest benchmarks)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def free_memory(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch.cuda, "OutOfMemoryError", None), MemoryError) if t)
    return isinstance(e, oom_types) or "out of memory" in str(e).lower()


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
