"""The "cuda" backend: the C++/CUDA extension lfi_C (csrc/), CUDA kernels for CUDA tensors and a
multithreaded CPU build of the same per-row math for CPU tensors. Loaded (or JIT-built) on first
use by lfi.backends.cuda._ext; `extension_info()` reports its status without building."""
from lfi.backends.cuda._ext import extension_info

__all__ = ["extension_info"]
