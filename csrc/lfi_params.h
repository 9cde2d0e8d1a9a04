// Plain parameter structs shared by the host glue (csrc/ops.cpp), the CPU kernels (csrc/cpu) and
// the CUDA kernels (csrc/cuda). No torch headers: the .cu files compile without them.
//
// Every tensor is passed as a Strided view: a pointer, four element strides (0 along broadcast
// dims, so masks and targets are never expanded in memory) and a runtime dtype code. Inputs of
// any of float16 / bfloat16 / float32 / float64 (and bool masks) are converted to the compute
// type when loaded, outputs converted when stored. Row statistics are contiguous arrays of the
// accumulation type (float; double for float64 on the CPU): attention's (m, log l) (B, H, M, 2),
// the KL ops' stats and tstats (B, H, M, 2), kl, the fused KL's tnorm and delta (B, H, M).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LFI_PARAMS_HD __host__ __device__
#else
#define LFI_PARAMS_HD
#endif

namespace lfi {

enum DType : int32_t { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3, kBool = 4 };

struct Strided {
  void* ptr = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  int32_t dtype = kF32;
  LFI_PARAMS_HD bool defined() const { return ptr != nullptr; }
};

// interaction_attention forward and backward.
struct AttnParams {
  int64_t B = 0, H = 0, Hkv = 0, M = 0, N = 0, D = 0, Dv = 0;
  double scale = 1.0;  // score scale; the kernels use scale * log2(e)
  bool causal = false;
  bool mask_bool = false;
  int64_t w_start = 0, w_stop = 0;  // map rows [w_start, w_stop)

  Strided q, k, v, mask, kl_target;  // mask / kl_target: undefined when absent
  // forward outputs
  Strided out, weights;              // weights (B, H, w_stop - w_start, N)
  void* stats = nullptr;             // row statistics (B, H, M, 2) acc type: (m, log l), see lfi/_numerics.py
  void* kl = nullptr;                // (B, H, M) acc type, with kl_target
  void* tnorm = nullptr;             // (B, H, M) acc type, with kl_target (read in the backward)
  // backward inputs / outputs
  Strided grad_out, grad_weights, grad_kl;  // grad_weights rows are i - w_start; grad_kl 3-D strides
  void* delta = nullptr;             // (B, H, M) acc type workspace
  Strided dq, dk, dv;
  void* ds = nullptr;                // (B, H, M, N) acc type, contiguous: dS for the mask gradient
  void* workspace = nullptr;         // CPU: per-chunk dk / dv partial sums (acc type)
};

// attention_kl (dense student logits) and attention_kl_qk (logits = q k^T on the fly).
struct KLParams {
  int64_t B = 0, H = 0, M = 0, N = 0;
  double student_scale = 1.0, target_scale = 1.0;
  bool target_is_logits = false;

  Strided logits;             // attention_kl: (B, H, M, N)
  Strided target, key_mask;   // dense target (may be undefined for an implicit teacher), bool mask
  // attention_kl_qk
  int64_t Hkv = 1, D = 0;
  Strided q, k;
  bool implicit = false;      // target = (q_t k_t^T) * target_scale
  int64_t Ht = 1, Htk = 1, Dt = 0;
  Strided q_t, k_t;
  // outputs / backward
  void* kl = nullptr;
  void* stats = nullptr;       // (B, H, M, 2) acc type: the student's (m, log l)
  void* tstats = nullptr;      // (B, H, M, 2) acc type: the target's (t_shift, t_log_z), see kl_finish
  Strided grad_kl;            // (B, H, M) strides in s[0..2]
  Strided dlogits, dq, dk;
  void* workspace = nullptr;  // CPU: per-chunk dk partial sums
};

}  // namespace lfi
