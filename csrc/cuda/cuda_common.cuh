// Device helpers of the CUDA kernels: dtype-converting loads/stores through strides, warp
// reductions, shared-memory tile loaders, launch helpers. No torch headers.
// With LFI_CUDA_EMULATE the same kernels compile as host C++ against csrc/emu/cuda_emu.h (a
// thread-per-CUDA-thread emulator used to test the kernels' logic on machines without a GPU).
#pragma once

#ifdef LFI_CUDA_EMULATE
#include "../emu/cuda_emu.h"
#define LFI_DYNAMIC_SMEM(name) float* name = ::lfi_emu::shared_memory()
#define LFI_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::lfi_emu::launch(kernel, static_cast<int64_t>(grid), block, smem, __VA_ARGS__)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define LFI_DYNAMIC_SMEM(name) extern __shared__ float name[]
#define LFI_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <cstdint>

#include "../lfi_math.h"
#include "../lfi_params.h"

namespace lfi {
namespace cuda_k {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;

// Block layout shared by the attention kernels (attention.cu) and the KL-qk kernels (kl.cu).
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarp;
constexpr int kBM = 16;              // query rows per block
constexpr int kRPW = kBM / kWarps;   // query rows per warp
constexpr int kBN = 32;              // keys per tile: one per lane
constexpr int kBNK = 16;             // keys per dk(/dv) block
constexpr int kKPW = kBNK / kWarps;  // keys per warp in dk(/dv)
constexpr int kBMR = 32;             // query rows per dk(/dv) tile: one per lane

// Element `off` of a tensor of runtime dtype `dt`, as float. The switch is uniform across a warp
// (one dtype per tensor), so it costs a few instructions per load and no divergence.
__device__ __forceinline__ float ldf(const void* p, int64_t off, int32_t dt) {
  switch (dt) {
    case kF16: return __half2float(static_cast<const __half*>(p)[off]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[off]);
    case kF32: return static_cast<const float*>(p)[off];
    case kF64: return static_cast<float>(static_cast<const double*>(p)[off]);
    default: return static_cast<float>(static_cast<const uint8_t*>(p)[off]);
  }
}

__device__ __forceinline__ void stf(void* p, int64_t off, int32_t dt, float v) {
  switch (dt) {
    case kF16: static_cast<__half*>(p)[off] = __float2half_rn(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[off] = __float2bfloat16_rn(v); break;
    case kF32: static_cast<float*>(p)[off] = v; break;
    default: static_cast<double*>(p)[off] = static_cast<double>(v); break;
  }
}

__device__ __forceinline__ int64_t off4(const Strided& t, int64_t a, int64_t b, int64_t c, int64_t d) {
  return a * t.s[0] + b * t.s[1] + c * t.s[2] + d * t.s[3];
}

// Max / sum over groups of LANES consecutive lanes (a power of two <= 32; every lane of the warp
// calls it): 32 = the whole warp, 4 = the quad sharing a tensor-core accumulator row.
template <int LANES>
__device__ __forceinline__ float lanes_max(float v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

template <int LANES>
__device__ __forceinline__ float lanes_sum(float v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <int LANES>
__device__ __forceinline__ KLSums<float> lanes_sum(KLSums<float> s) {
  s.x = lanes_sum<LANES>(s.x);
  s.y = lanes_sum<LANES>(s.y);
  s.c = lanes_sum<LANES>(s.c);
  return s;
}

__device__ __forceinline__ float warp_max(float v) { return lanes_max<kWarp>(v); }
__device__ __forceinline__ float warp_sum(float v) { return lanes_sum<kWarp>(v); }
__device__ __forceinline__ KLSums<float> warp_sum(KLSums<float> s) { return lanes_sum<kWarp>(s); }

// dst[r * ld + d] = t(b, head, row0 + r, d) * mul for r < rows, d < D (0 past `limit` rows and in
// the padding d in [D, ld)). All threads of the block take part; call __syncthreads() after.
__device__ __forceinline__ void load_rows(float* dst, const Strided& t, int64_t b, int64_t head, int64_t row0,
                                          int rows, int D, int ld, int64_t limit, float mul) {
  const int n = rows * ld;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const int r = idx / ld, d = idx - r * ld;
    const int64_t row = row0 + r;
    dst[idx] = (row < limit && d < D) ? ldf(t.ptr, off4(t, b, head, row, d), t.dtype) * mul : 0.0f;
  }
}

// Row statistics src[(base + row) * stride + comp] of `rows` rows starting at row0 into shared
// memory, `fill` past M.
__device__ __forceinline__ void load_stats(float* dst, const float* src, int64_t base, int64_t row0, int rows,
                                           int64_t M, int stride, int comp, float fill) {
  for (int r = threadIdx.x; r < rows; r += blockDim.x)
    dst[r] = row0 + r < M ? src[(base + row0 + r) * stride + comp] : fill;
}

// The saved statistics (shift m, log l) of row i of head bh; past M (0, +inf): P = 0 there.
__device__ __forceinline__ void row_stats(const void* stats, int64_t bh, int64_t M, int64_t i, float& m,
                                          float& log_l) {
  const float* st = static_cast<const float*>(stats);
  m = i < M ? st[2 * (bh * M + i)] : 0.0f;
  log_l = i < M ? st[2 * (bh * M + i) + 1] : pos_inf<float>();
}

// The starting state of R rows: online softmax (m = -inf, l = 0) and KL sums (kl_init).
template <int R>
__device__ __forceinline__ void init_rows(float (&m)[R], float (&l)[R], KLSums<float> (&st)[R], bool logits) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = neg_inf<float>();
    l[r] = 0.0f;
    st[r] = kl_init<float>(logits);
  }
}

// acc[r] += sum over jj < n of x(r, jj) rows[jj] for the warp's R rows (or keys): lane jj holds
// x(r, jj) in x[r] (broadcast by shuffles), rows is a shared tile of n rows at stride ld, the lane
// owns dims lane + c * kWarp < D. dQ += dS K, dK += dS^T Q, dV += P^T dO, O += P V.
template <int R, int DL>
__device__ __forceinline__ void add_outer(float (&acc)[R][DL], const float (&x)[R], const float* rows, int ld, int n,
                                          int D, int lane) {
  for (int jj = 0; jj < n; ++jj) {
    const float* row = rows + jj * ld;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float xj = __shfl_sync(kFull, x[r], jj);
#pragma unroll
      for (int c = 0; c < DL; ++c) {
        const int e = lane + c * kWarp;
        if (e < D) acc[r][c] += xj * row[e];
      }
    }
  }
}

// acc[r] += <rows[r], col> over `len` dims for the warp's kRPW rows of a shared tile (row stride
// len) and the lane's column `col` (a row of another shared tile): scores Q K^T, dP = dO V^T.
__device__ __forceinline__ void add_row_dots(float (&acc)[kRPW], const float* rows, const float* col, int len) {
  for (int d = 0; d < len; ++d) {
    const float cv = col[d];
#pragma unroll
    for (int r = 0; r < kRPW; ++r) acc[r] += rows[r * len + d] * cv;
  }
}

// acc[kk] = <row `lane` of A, row warp * kKPW + kk of B> over `len` columns: the lane's dot products
// with its warp's kKPW rows of B, from shared tiles A (rows padded to len + 1) and B (rows of len).
__device__ __forceinline__ void lane_dots(float (&acc)[kKPW], const float* A, const float* B, int len, int lane,
                                          int warp) {
  const float* ar = A + lane * (len + 1);
  const float* bw = B + warp * kKPW * len;
#pragma unroll
  for (int kk = 0; kk < kKPW; ++kk) acc[kk] = 0.0f;
  for (int d = 0; d < len; ++d) {
    const float av = ar[d];
#pragma unroll
    for (int kk = 0; kk < kKPW; ++kk) acc[kk] += av * bw[kk * len + d];
  }
}

// The KLGradRow of row r of a staged query tile kept in shared memory: field f at rows[f * stride + r]
// (g, 1 / Z, t_shift, t_log_z).
__device__ __forceinline__ void put_kl_row(float* rows, int stride, int r, const KLGradRow<float>& k) {
  rows[r] = k.g;
  rows[stride + r] = k.inv_z;
  rows[2 * stride + r] = k.t_shift;
  rows[3 * stride + r] = k.t_log_z;
}
__device__ __forceinline__ KLGradRow<float> get_kl_row(const float* rows, int stride, int r) {
  return KLGradRow<float>{rows[r], rows[stride + r], rows[2 * stride + r], rows[3 * stride + r]};
}

// Stores scale * dq[r] into the rows i0 + r (those < M) of the (B, H, M, D) tensor `out` at (b, h)
// (also dK / dV: R = kKPW keys from i0, M = N).
template <int R, int DL>
__device__ __forceinline__ void store_warp_rows(const Strided& out, const float (&dq)[R][DL], int64_t b, int64_t h,
                                                int64_t i0, int64_t M, int D, float scale, int lane) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + r;
    if (i >= M) continue;
#pragma unroll
    for (int c = 0; c < DL; ++c) {
      const int e = lane + c * kWarp;
      if (e < D) stf(out.ptr, off4(out, b, h, i, e), out.dtype, dq[r][c] * scale);
    }
  }
}

// Per-lane register count for head dims up to 32 * DL.
inline int lanes_for(int64_t d) { return d <= 64 ? 2 : (d <= 128 ? 4 : 8); }

template <typename Kernel>
inline cudaError_t prepare(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024) return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(smem));
  return cudaSuccess;
}

inline const char* check_launch() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

#define LFI_CUDA_TRY(expr)                               \
  do {                                                   \
    const cudaError_t lfi_err_ = (expr);                 \
    if (lfi_err_ != cudaSuccess) return cudaGetErrorString(lfi_err_); \
  } while (0)

#define LFI_DISPATCH_DL(dl, DLC, ...)           \
  switch (dl) {                                 \
    case 2: { constexpr int DLC = 2; __VA_ARGS__; break; } \
    case 4: { constexpr int DLC = 4; __VA_ARGS__; break; } \
    default: { constexpr int DLC = 8; __VA_ARGS__; break; } \
  }

// Shared by the CUDA-core (attention.cu) and tensor-core (attention_tc.cu) kernels.
// Applies causality, bounds and the mask to the score of row i, key j.
__device__ __forceinline__ float masked_score(float s, const AttnParams& p, int64_t b, int64_t h, int64_t i,
                                              int64_t j) {
  bool valid = i < p.M && j < p.N && (!p.causal || j <= i);
  if (valid && p.mask.ptr != nullptr) {
    const float mv = ldf(p.mask.ptr, off4(p.mask, b, h, i, j), p.mask.dtype);
    if (p.mask_bool) valid = mv != 0.0f;
    else s += mv;
  }
  return valid ? s : neg_inf<float>();
}

// The fused KL gradient's factors of row i of head (b, h), bh = b * H + h (zeros without a fused
// KL or past M).
__device__ __forceinline__ KLGradRow<float> attn_kl_row(const AttnParams& p, int64_t b, int64_t h, int64_t bh,
                                                        int64_t i) {
  if (p.grad_kl.ptr == nullptr || i >= p.M) return KLGradRow<float>{0.0f, 0.0f, 0.0f, 0.0f};
  const float g = ldf(p.grad_kl.ptr, b * p.grad_kl.s[0] + h * p.grad_kl.s[1] + i * p.grad_kl.s[2], p.grad_kl.dtype);
  return kl_grad_row(g, 0.0f, static_cast<const float*>(p.tnorm)[bh * p.M + i], false);
}

// dS of row i, key j from its probability, dP (without G) and the row's delta / KL factors.
__device__ __forceinline__ float dscore(const AttnParams& p, int64_t b, int64_t h, int64_t i, int64_t j, float s,
                                        float pr, float dp, float delta, const KLGradRow<float>& klr) {
  const bool inside = i < p.M && j < p.N;
  if (p.grad_weights.ptr != nullptr && inside && i >= p.w_start && i < p.w_stop)
    dp += ldf(p.grad_weights.ptr, off4(p.grad_weights, b, h, i - p.w_start, j), p.grad_weights.dtype);
  float ds = attn_dscore(pr, dp, delta);
  if (p.grad_kl.ptr != nullptr) {
    const float t = inside ? ldf(p.kl_target.ptr, off4(p.kl_target, b, h, i, j), p.kl_target.dtype) : 0.0f;
    ds += kl_dscore(pr, t, s > neg_inf<float>(), klr, 0.0f, false);
  }
  return ds;
}

}  // namespace cuda_k
}  // namespace lfi
