"""What the C++/CUDA extension is built from: sources and compiler flags.

The one list read by both builds: the JIT loader (lfi/backends/cuda/_ext.py) imports it, and
setup.py (ahead-of-time build, ``LFI_BUILD_CUDA=1``) runs this file with ``runpy`` — so it imports
nothing. Paths are relative to csrc/.
"""
CPU_SOURCES = ("bindings.cpp", "ops.cpp", "cpu/attention.cpp", "cpu/kl.cpp")
CUDA_SOURCES = ("cuda/attention.cu", "cuda/attention_tc.cu", "cuda/kl.cu")
# -fopenmp: at::parallel_for is header-inline OpenMP in torch's builds; without the flag the CPU
# kernels would silently run on one thread (libgomp.so.1 resolves to the copy torch has loaded).
CXX_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp")
LD_FLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DLFI_WITH_CUDA")
# CPU kernels for the build machine's AVX2/FMA, or portable SSE2 (LFI_CPU_ISA=generic).
ISA_FLAGS = {"avx2": ("-mavx2", "-mfma", "-mf16c"), "generic": ()}
# Without a GPU torch cannot detect the architecture to compile for.
DEFAULT_ARCHS = "8.0;9.0"
