"""The "triton" backend: launchers for the kernels in lfi.kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
