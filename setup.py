"""LFI: fused attention with exact attention maps, for Learning from Interactions."""
from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="lfi",
    version="0.1.0",
    description="Kernel-accelerated attention with exact, differentiable attention maps (Learning from Interactions)",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Triton kernels live in the top-level kernels/ folder and install as lfi.kernels.
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
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["lfi = lfi.cli:main"]},
)
