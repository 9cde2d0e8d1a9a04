// Entry points of the CPU and CUDA kernels; both take the parameter structs of lfi_params.h.
#pragma once

#include "lfi_params.h"

namespace lfi {
namespace cpu {
// acc_double: compute (and store row statistics) in double, for float64 inputs.
void attention_forward(const AttnParams& p, bool acc_double);
void attention_backward(const AttnParams& p, bool acc_double);
void kl_forward(const KLParams& p, bool acc_double);
void kl_backward(const KLParams& p, bool acc_double);
void kl_qk_forward(const KLParams& p, bool acc_double);
void kl_qk_backward(const KLParams& p, bool acc_double);
}  // namespace cpu

#ifdef LFI_WITH_CUDA
namespace cuda {
// Launch on `stream` (a cudaStream_t); return nullptr on success, else an error message.
const char* attention_forward(const AttnParams& p, void* stream);
const char* attention_backward(const AttnParams& p, void* stream);
const char* kl_forward(const KLParams& p, void* stream);
const char* kl_backward(const KLParams& p, void* stream);
const char* kl_qk_forward(const KLParams& p, void* stream);
const char* kl_qk_backward(const KLParams& p, void* stream);
// The tensor-core kernels (attention_tc.cu): bf16 / fp16 q, k, v with D, Dv <= 128.
// attention_forward / attention_backward use them when attention_forward_tc_applies(p); of the
// backward's delta pre-pass, rowsum(dO * O) (no matrix product) stays on CUDA cores, the map rows'
// rowsum(P * G) (P recomputed from Q K^T) runs on tensor cores.
bool attention_forward_tc_applies(const AttnParams& p);
const char* attention_forward_tc(const AttnParams& p, void* stream);
const char* attention_backward_tc(const AttnParams& p, void* stream);
// kl_qk_forward / kl_qk_backward run on tensor cores (kl.cu) when this holds: bf16 / fp16 q, k (and
// q_t, k_t of an implicit teacher, same dtype) with D (and Dt) <= 128.
bool kl_qk_tc_applies(const KLParams& p);
// Comma-separated list of the compute capabilities compiled into the device code.
const char* compiled_archs();
}  // namespace cuda
#endif

}  // namespace lfi
