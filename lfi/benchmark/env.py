"""The machine a benchmark runs on: default device and dtype, dtype names, device names, versions."""
from __future__ import annotations

import os
import platform

import torch

__all__ = ["default_device", "default_dtype", "parse_dtype", "dtype_name", "cpu_model", "device_name", "versions",
           "synchronize"]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (what training uses), fp32 on CPU (CPU bf16 matmuls are not representative)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16, fp64") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.float64: "fp64"}.get(dtype, str(dtype).replace("torch.", ""))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        major, minor = torch.cuda.get_device_capability(idx)
        return f"{name} (sm_{major}{minor})"
    if device.type == "cpu":
        return f"{cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"
    return str(device)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version
        out["lfi"] = version("lfi")
    except Exception:
        try:
            import lfi
            out["lfi"] = getattr(lfi, "__version__", "unknown")
        except Exception:
            out["lfi"] = "not importable"
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "not installed"
    out["cuda (torch build)"] = torch.version.cuda or "none"
    return out


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
