"""Loads the C++/CUDA extension behind backend="cuda": the library registering `torch.ops.lfi_C.*`.

Order:
  1. an ahead-of-time build `lfi._C` (``LFI_BUILD_CUDA=1 pip install --no-build-isolation -e .``);
  2. else a JIT build of csrc/ with ninja (``torch.utils.cpp_extension.load``), cached in torch's
     extension directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so only the
     first use in an environment compiles (about 1-3 minutes on 2 cores; CPU-only much less).
     With nvcc (CUDA_HOME) the CUDA kernels are compiled too; without it only the CPU kernels are
     (a compile-time macro, LFI_WITH_CUDA, leaves the CUDA registrations out).

The library is loaded with ``torch.ops.load_library`` (no Python module object). Without a GPU
torch cannot detect the architecture, so TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" then.
The CPU kernels are compiled for AVX2/FMA where the CPU has them (cpu_isa(); LFI_CPU_ISA=generic
for SSE2 only). Environment: LFI_CUDA_EXT_CUDA=0 builds the CPU kernels only;
LFI_CUDA_EXT_VERBOSE=1 shows the build; LFI_CUDA_EXT_JIT=1 ignores an ahead-of-time build;
MAX_JOBS caps ninja's parallelism; CXX names the C++ compiler.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from lfi.backends.cuda.build_spec import (
    CPU_SOURCES,
    CUDA_SOURCES,
    CXX_FLAGS,
    DEFAULT_ARCHS,
    ISA_FLAGS,
    LD_FLAGS,
    NVCC_FLAGS,
)

CSRC = Path(os.environ.get("LFI_CSRC", Path(__file__).resolve().parents[3] / "csrc"))
JIT_NAME_CUDA = "lfi_C"
JIT_NAME_CPU = "lfi_C_cpu"

_lock = threading.RLock()
_state: dict = {"loaded": False, "how": None, "path": None, "error": None, "cuda": False, "archs": None,
                "build_seconds": None, "info": None}


def cuda_home() -> str | None:
    """The CUDA toolkit root holding bin/nvcc and include/cuda_runtime.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _ninja() -> bool:
    return shutil.which("ninja") is not None


def _aot_path() -> str | None:
    try:
        spec = importlib.util.find_spec("lfi._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def cpu_isa() -> str:
    """"avx2" when the CPU kernels are built with -mavx2 -mfma -mf16c (the CPU has them, as
    reported by torch.backends.cpu.get_cpu_capability()), else "generic" (SSE2). LFI_CPU_ISA=generic
    forces the portable build. The JIT cache name carries the ISA, so machines sharing a cache
    directory never load a build for instructions they lack."""
    if os.environ.get("LFI_CPU_ISA", "").lower() == "generic":
        return "generic"
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        return "generic"
    return "avx2" if cap in ("AVX2", "AVX512") else "generic"




def _want_cuda() -> bool:
    return os.environ.get("LFI_CUDA_EXT_CUDA", "1") != "0" and cuda_home() is not None


def build_problem() -> str | None:
    """Why a JIT build cannot be attempted here (missing compiler, ninja or sources), or None."""
    if not (CSRC / "bindings.cpp").exists():
        return (f"the C++ sources are missing ({CSRC}); install lfi from a source checkout "
                "(pip install -e .) or set LFI_CSRC to the csrc/ folder")
    if _compiler() is None:
        return f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r}, g++, clang++; set CXX)"
    if not _ninja():
        return "ninja is not installed (pip install ninja)"
    return None


# Probed once at import (cheap: PATH lookups, no subprocess), so that dispatch decisions are
# plain Python that torch.compile can trace.
PROBE = {"aot": _aot_path(), "build_problem": build_problem(), "cuda_home": cuda_home()}


def _parse_info(info: str) -> dict:
    out = {}
    for item in info.split(";"):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k] = v
    return out


def _record_loaded(how: str, path: str) -> None:
    info = _parse_info(torch.ops.lfi_C.build_info())
    _state.update(loaded=True, how=how, path=path, error=None, cuda=info.get("cuda") == "1",
                  archs=[a for a in info.get("archs", "").split(",") if a] or None, info=info)


def _jit_build(verbose: bool) -> str:
    with_cuda = _want_cuda()
    problem = build_problem()
    if problem is not None:
        raise RuntimeError(f"backend='cuda': cannot build the lfi_C extension: {problem}")
    from torch.utils import cpp_extension

    sources = [str(CSRC / s) for s in CPU_SOURCES]
    cflags = list(CXX_FLAGS)
    if with_cuda:
        home = cuda_home()
        os.environ.setdefault("CUDA_HOME", home)
        cpp_extension.CUDA_HOME = home  # torch guesses it at import, e.g. from a wrapper script's folder
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        sources += [str(CSRC / s) for s in CUDA_SOURCES]
        cflags.append("-DLFI_WITH_CUDA")
    isa = cpu_isa()
    cflags += list(ISA_FLAGS[isa])
    name = (JIT_NAME_CUDA if with_cuda else JIT_NAME_CPU) + ("_avx2" if isa == "avx2" else "")
    start = time.perf_counter()
    path = cpp_extension.load(
        name=name, sources=sources, extra_cflags=cflags, extra_cuda_cflags=list(NVCC_FLAGS) if with_cuda else None,
        extra_ldflags=list(LD_FLAGS),
        extra_include_paths=[str(CSRC)], with_cuda=with_cuda, is_python_module=False, verbose=verbose,
    )
    _state["build_seconds"] = time.perf_counter() - start
    if isinstance(path, str):
        return path
    return os.path.join(cpp_extension._get_build_directory(name, False), f"{name}.so")


def load(verbose: bool | None = None) -> None:
    """Loads the extension once per process (AOT build first, else JIT). Raises RuntimeError."""
    if _state["loaded"]:
        return
    with _lock:
        if _state["loaded"]:
            return
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        if verbose is None:
            verbose = os.environ.get("LFI_CUDA_EXT_VERBOSE", "0") == "1"
        aot = _aot_path()
        try:
            if aot is not None and os.environ.get("LFI_CUDA_EXT_JIT", "0") != "1":
                torch.ops.load_library(aot)
                _record_loaded("aot", aot)
            else:
                path = _jit_build(verbose)
                _record_loaded("jit", path)
        except Exception as exc:  # compiler errors, missing tools: remembered, not retried
            msg = str(exc)
            if not msg.startswith("backend='cuda'"):
                msg = f"backend='cuda': building or loading the lfi_C extension failed: {type(exc).__name__}: {exc}"
            _state["error"] = msg
            raise RuntimeError(msg) from exc


def ops():
    """torch.ops.lfi_C, loading (or building) the extension first."""
    load()
    return torch.ops.lfi_C


def is_loaded() -> bool:
    return _state["loaded"]


def unusable_reason(device: torch.device) -> str | None:
    """Why backend='cuda' cannot run on `device` (None when it can). Never builds anything; uses
    only the import-time PROBE and this process's load state."""
    if _state["error"] is not None:
        return _state["error"]
    if device.type == "cpu":
        if _state["loaded"] or PROBE["aot"] is not None:
            return None
        return PROBE["build_problem"]
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if _state["loaded"]:
            return None if _state["cuda"] else "the lfi_C extension was built without CUDA (no nvcc at build time)"
        if PROBE["aot"] is not None:
            return None
        if PROBE["cuda_home"] is None:
            return "nvcc not found (set CUDA_HOME) and no ahead-of-time build of lfi._C"
        return PROBE["build_problem"]
    return f"no lfi_C kernels for device type {device.type!r}"


def ready_for_cuda() -> bool:
    """True when the extension is already usable for CUDA tensors without compiling anything: loaded
    in this process with CUDA kernels, or an ahead-of-time build lfi._C that loads and has them."""
    if _state["loaded"]:
        return bool(_state["cuda"])
    if _state["error"] is not None or PROBE["aot"] is None or os.environ.get("LFI_CUDA_EXT_JIT", "0") == "1":
        return False
    try:
        load()
    except RuntimeError:
        return False
    return bool(_state["cuda"])


EMU_SOURCES = ("emu/attention_emu.cpp", "emu/attention_tc_emu.cpp", "emu/kl_emu.cpp", "emu/tc_selftest_emu.cpp")
_emulator: dict = {}


def load_emulator(verbose: bool = False):
    """Builds (JIT, cached) and loads the CUDA-emulator variant of the extension: the CUDA kernels
    of csrc/cuda compiled as host C++ against csrc/emu/cuda_emu.h (one OS thread per CUDA thread),
    registered as torch.ops.lfi_C_emu.* for CPU tensors. For testing the CUDA kernels' logic where
    no GPU exists; slow, small shapes only. Returns torch.ops.lfi_C_emu."""
    with _lock:
        if "ops" not in _emulator:
            problem = build_problem()
            if problem is not None:
                raise RuntimeError(f"cannot build the lfi_C CUDA emulator: {problem}")
            from torch.utils import cpp_extension

            cpp_extension.load(
                name="lfi_C_emu" + ("_avx2" if cpu_isa() == "avx2" else ""),
                sources=[str(CSRC / s) for s in CPU_SOURCES + EMU_SOURCES],
                extra_cflags=list(CXX_FLAGS) + list(ISA_FLAGS[cpu_isa()])
                + ["-DLFI_WITH_CUDA", "-DLFI_CUDA_EMULATE", "-Wno-unknown-pragmas"], extra_ldflags=list(LD_FLAGS),
                extra_include_paths=[str(CSRC)], with_cuda=False, is_python_module=False, verbose=verbose,
            )
            _emulator["ops"] = torch.ops.lfi_C_emu
    return _emulator["ops"]


def _jit_cached(name: str) -> str | None:
    try:
        from torch.utils import cpp_extension
        path = os.path.join(cpp_extension._get_build_directory(name, False), f"{name}.so")
    except Exception:
        return None
    return path if os.path.exists(path) else None


def extension_info() -> dict:
    """Status of the extension for `lfi info`; never builds. Keys: built (loaded in this process),
    how ("aot" / "jit" / None), path, cuda (has CUDA kernels), archs (compute capabilities compiled,
    e.g. ["80", "90"]), error, build_seconds (this process's JIT build, if any), aot_path (an
    ahead-of-time build found), cpu_isa ("avx2" / "generic": the CPU kernels' instruction set),
    jit_cache (a cached JIT build found), nvcc (CUDA toolkit root),
    build_problem (why a JIT build would fail)."""
    return {
        "built": _state["loaded"],
        "how": _state["how"],
        "path": _state["path"],
        "cuda": _state["cuda"],
        "archs": _state["archs"],
        "error": _state["error"],
        "build_seconds": _state["build_seconds"],
        "aot_path": _aot_path(),
        "cpu_isa": cpu_isa(),
        "jit_cache": next(filter(None, (_jit_cached(n + sfx) for n in (JIT_NAME_CUDA, JIT_NAME_CPU)
                                        for sfx in ("_avx2", ""))), None),
        "nvcc": cuda_home(),
        "build_problem": build_problem(),
    }
