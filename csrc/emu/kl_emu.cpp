// Emulator build only (LFI_CUDA_EMULATE): the CUDA kernels of ../cuda/kl.cu as host C++.
#include "../cuda/kl.cu"
