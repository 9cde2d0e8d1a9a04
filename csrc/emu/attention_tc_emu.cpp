// Emulator build only (LFI_CUDA_EMULATE): the tensor-core kernels of ../cuda/attention_tc.cu as host C++.
#include "../cuda/attention_tc.cu"
