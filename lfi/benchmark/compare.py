"""The side-by-side comparison behind ``lfi bench``: every implementation on one shape, each
row timed, peak-measured and checked against eager."""
from __future__ import annotations

import traceback
from typing import Any, Callable, Optional, Sequence

import torch

from lfi.benchmark.cases import make_case
from lfi.benchmark.impls import get_impl
from lfi.benchmark.measure import free_memory, time_ms

__all__ = ["run_comparison", "max_abs_diff"]


def max_abs_diff(a: Any, b: Any) -> float:
    """Max |a - b| over matching tensors in (possibly nested) tuples, computed in fp32."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return float("inf")


def _short_error(e: BaseException, limit: int = 90) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return tuple(_detach(t) for t in x)
    return x


def run_comparison(shape, device, dtype, impl_names: Sequence[str], modes: Sequence[str], min_time: float,
                   check: bool, verbose: bool = False, progress: Optional[Callable[[str], None]] = None,
                   allow_build: bool = False) -> list[dict[str, Any]]:
    """Time every (impl, mode, maps) combination on one shape; one dict per row.

    Rows: impl, label, mode, maps, median_ms, peak_bytes (extra memory at the peak of one call),
    max_err (max |difference| to eager's result when ``check``), error (a failure, which never ends
    the table) and skipped (why the implementation is not usable here). eager runs first in each
    (mode, maps) group: it is the reference for the ratios and the error check. ``progress`` is
    called with a short label before each row.
    """
    rows: list[dict[str, Any]] = []
    refs: dict[tuple[str, bool], Any] = {}
    combos = []
    for mode in modes:
        for maps in (False, True):
            # eager first: it is the reference for the ratios and the error check
            for name in sorted(impl_names, key=lambda n: n != "eager"):
                impl = get_impl(name)
                if maps and not impl.maps:
                    continue
                combos.append((mode, maps, impl))

    for mode, maps, impl in combos:
        row: dict[str, Any] = {"impl": impl.name, "label": impl.label(device, dtype), "mode": mode,
                               "maps": maps, "median_ms": None, "peak_bytes": None, "max_err": None,
                               "error": None, "skipped": None}
        rows.append(row)
        if progress is not None:
            progress(f"{row['label']} {mode} {'maps' if maps else 'no maps'}")
        ok, reason = impl.available(device, dtype, allow_build=allow_build)
        if not ok:
            row["skipped"] = reason
            continue
        case = None
        try:
            case = make_case(impl, shape, device, dtype, mode, maps)
            case.step()  # warm-up (compilation, lazy init)
            result, peak = case.measure_peak()
            row["peak_bytes"] = peak
            if check:
                key = (mode, maps)
                if impl.name == "eager":
                    refs[key] = _detach(result)
                elif key in refs:
                    row["max_err"] = max_abs_diff(_detach(result), refs[key])
            del result
            row["median_ms"] = time_ms(case.step, min_run_time=min_time)["median_ms"]
        except Exception as e:  # one failing impl must not end the table
            row["error"] = _short_error(e)
            if verbose:
                traceback.print_exc()
        finally:
            if case is not None:
                case.release()
            del case
            free_memory(device)
    return rows
