// Emulator build only (LFI_CUDA_EMULATE): the CUDA kernels of ../cuda/attention.cu as host C++.
#include "../cuda/attention.cu"
