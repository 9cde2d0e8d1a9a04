"""The one place that decides which backend runs an op.

Backends:
  "torch"  -- the PyTorch reference (lfi.backends.reference), any device and dtype, row-chunked.
  "triton" -- Triton kernels (lfi.backends.triton): CUDA tensors, or CPU tensors when the
              interpreter was enabled (TRITON_INTERPRET=1 before lfi.kernels was imported).
"auto" picks triton for CUDA tensors when Triton works, else torch; the environment variable
LFI_BACKEND overrides "auto".
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("torch", "triton")
CHOICES = ("auto",) + BACKENDS


@lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("lfi.kernels")
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return f"triton unavailable: {type(exc).__name__}: {exc}"
    return None


def triton_interpreting() -> bool:
    """True when Triton kernels were defined under TRITON_INTERPRET=1 (CPU execution)."""
    if _triton_import_error() is not None:
        return False
    from lfi.kernels import INTERPRET

    return INTERPRET


def backend_status(device: torch.device | str) -> dict[str, tuple[bool, str]]:
    """Maps each backend name to (usable on `device`, reason)."""
    device = torch.device(device)
    status = {"torch": (True, "PyTorch reference, any device")}
    err = _triton_import_error()
    if err is not None:
        status["triton"] = (False, err)
    elif device.type == "cuda":
        if triton_interpreting():
            status["triton"] = (False, "TRITON_INTERPRET=1 is set: Triton runs on CPU tensors only")
        elif not torch.cuda.is_available():
            status["triton"] = (False, "CUDA is not available")
        else:
            status["triton"] = (True, f"Triton kernels on {torch.cuda.get_device_name(device)}")
    elif device.type == "cpu":
        if triton_interpreting():
            status["triton"] = (True, "Triton interpreter (TRITON_INTERPRET=1): correct but slow")
        else:
            status["triton"] = (False, "CPU tensors need TRITON_INTERPRET=1 set before lfi is imported")
    else:
        status["triton"] = (False, f"no Triton support for device type {device.type!r}")
    return status


def resolve(backend: str, device: torch.device) -> str:
    """Returns the concrete backend name for a request on `device`, or raises ValueError."""
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("LFI_BACKEND", "auto") or "auto"
        if backend not in CHOICES:
            raise ValueError(f"LFI_BACKEND must be one of {CHOICES}, got {backend!r}")
        if backend == "auto":
            if device.type == "cuda" and backend_status(device)["triton"][0]:
                return "triton"
            return "torch"
    usable, reason = backend_status(device)[backend]
    if not usable:
        raise ValueError(f"backend={backend!r} cannot run on {device}: {reason}")
    return backend


_PACKAGES = {"torch": "reference", "triton": "triton"}


def implementation(backend: str, op: str):
    """The module implementing `op` on the concrete `backend`, e.g. lfi.backends.triton.interaction_attention."""
    return importlib.import_module(f"lfi.backends.{_PACKAGES[backend]}.{op}")
