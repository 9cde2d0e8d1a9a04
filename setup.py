"""LFI: fused attention with exact attention maps, for Learning from Interactions."""
import os
import runpy
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
README = ROOT / "README.md"
# One source for the version and for the extension's sources and flags (files that import nothing).
VERSION = runpy.run_path(str(ROOT / "lfi" / "_version.py"))["__version__"]
SPEC = runpy.run_path(str(ROOT / "lfi" / "backends" / "cuda" / "build_spec.py"))


def _cuda_extension():
    """LFI_BUILD_CUDA=1 builds the C++/CUDA extension lfi._C (backend="cuda") ahead of time:
    ``LFI_BUILD_CUDA=1 pip install --no-build-isolation -e .`` (the build imports the installed
    torch). A CUDAExtension when nvcc is found (CUDA_HOME, /usr/local/cuda or PATH), else the CPU
    kernels only (CppExtension). Without the variable nothing is compiled here and the extension
    is JIT-built on first use instead. Sources and flags: lfi/backends/cuda/build_spec.py (as the JIT build)."""
    if os.environ.get("LFI_BUILD_CUDA", "0") != "1":
        return [], {}
    import shutil

    import torch
    from torch.utils import cpp_extension

    cpu = [f"csrc/{f}" for f in SPEC["CPU_SOURCES"]]
    cuda = [f"csrc/{f}" for f in SPEC["CUDA_SOURCES"]]
    cxx = list(SPEC["CXX_FLAGS"])
    if os.environ.get("LFI_CPU_ISA", "").lower() != "generic" and \
            torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        cxx += list(SPEC["ISA_FLAGS"]["avx2"])
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        homes.append(str(Path(os.path.realpath(shutil.which("nvcc"))).parents[1]))
    home = next((h for h in homes if h and (Path(h) / "bin" / "nvcc").exists()
                 and (Path(h) / "include" / "cuda_runtime.h").exists()), None)
    include = [str(ROOT / "csrc")]
    if home is not None and os.environ.get("LFI_CUDA_EXT_CUDA", "1") != "0":
        os.environ.setdefault("CUDA_HOME", home)
        cpp_extension.CUDA_HOME = home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = SPEC["DEFAULT_ARCHS"]
        ext = cpp_extension.CUDAExtension(
            "lfi._C", cpu + cuda, include_dirs=include,
            extra_compile_args={"cxx": cxx + ["-DLFI_WITH_CUDA"],
                                "nvcc": list(SPEC["NVCC_FLAGS"])},
            extra_link_args=list(SPEC["LD_FLAGS"]),
        )
    else:
        ext = cpp_extension.CppExtension("lfi._C", cpu, include_dirs=include, extra_compile_args={"cxx": cxx},
                                         extra_link_args=list(SPEC["LD_FLAGS"]))
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _cuda_extension()

setup(
    name="lfi",
    version=VERSION,
    description="Kernel-accelerated attention with exact, differentiable attention maps (Learning from Interactions)",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Triton kernels live in the top-level kernels/ folder (the project's fixed top-level layout) and
    # install as lfi.kernels: `from lfi.kernels import ...` everywhere, no top-level package `kernels`.
    packages=find_packages(include=["lfi", "lfi.*"]) + ["lfi.kernels"],
    package_dir={"lfi": "lfi", "lfi.kernels": "kernels"},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "numpy",
        "rich",
        # Triton comes with CUDA builds of torch on Linux; listed so that CPU builds get the
        # interpreter too (TRITON_INTERPRET=1).
        'triton>=3.0; platform_system == "Linux"',
    ],
    extras_require={
        "dev": [
            "pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "ruff>=0.6",
            # the integration and training tests run in CI too
            "timm>=1.0", "open_clip_torch>=2.24", "transformers>=4.48", "torchvision",
            "safetensors", "tqdm", "matplotlib", "scipy",
        ],
        "integrations": ["timm>=1.0", "open_clip_torch>=2.24", "transformers>=4.48", "torchvision"],
        "train": ["timm>=1.0", "open_clip_torch>=2.24", "torchvision", "safetensors", "tqdm", "matplotlib", "scipy"],
    },
    entry_points={"console_scripts": ["lfi = lfi.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
