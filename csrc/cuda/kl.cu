// CUDA kernels of attention_kl (dense student logits) and attention_kl_qk (student logits
// q k^T * scale, teacher logits q_t k_t^T * scale_t computed tile by tile), sm_80+, float32 math.
//
// attention_kl: one warp per row, 128-key tiles (4 keys per lane); per tile the row state of
// lfi_math.h is rescaled to the tile's maxima and the lanes' partial sums are warp-reduced.
// attention_kl_qk: the layout of the attention kernels (attention.cu): forward and dq with one
// block per (16 query rows, b, h) and 32-key tiles in shared memory; dk with one block per
// (16 keys, b, kv head) looping over the group's heads and 32-row tiles (no atomics).
#include "../lfi_kernels.h"
#include "cuda_common.cuh"

namespace lfi {
namespace cuda_k {
namespace {

constexpr int kE = 4;  // keys per lane per tile in the dense row kernels

__device__ __forceinline__ float ninf() { return neg_inf<float>(); }

// Folds E keys per lane of one row into its state (warp-wide: every lane holds the same state).
template <int E>
__device__ __forceinline__ void kl_tile_step(float& m, float& l, KLSums<float>& st, const float (&s2)[E],
                                             const float (&tg)[E], const bool (&keep)[E], float t_scale2,
                                             bool logits) {
  float tmax = s2[0];
#pragma unroll
  for (int e = 1; e < E; ++e) tmax = fmaxf(tmax, s2[e]);
  const float sh_old = shift_of(m);
  softmax_rescale(m, l, warp_max(tmax));
  const float sh = shift_of(m);
  float ps = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) ps += exp_(s2[e] - sh);
  l += warp_sum(ps);
  float mu_new = 0.0f;
  if (logits) {
    float umax = ninf();
#pragma unroll
    for (int e = 0; e < E; ++e) umax = fmaxf(umax, kl_u(tg[e], keep[e], t_scale2));
    mu_new = fmaxf(st.y, warp_max(umax));
  }
  kl_rescale(st, sh_old, sh, mu_new, logits);
  const float shu = logits ? shift_of(st.y) : 0.0f;
  KLSums<float> part = kl_zero<float>();
#pragma unroll
  for (int e = 0; e < E; ++e) kl_add(part, s2[e], tg[e], keep[e], sh, shu, t_scale2, logits);
  kl_merge(st, warp_sum(part), logits);
}

__device__ __forceinline__ void store_row_stats(const KLParams& p, int64_t r, float m, float l,
                                                const KLSums<float>& st, bool logits) {
  float kl, t_shift, t_log_z;
  kl_finish(st, log_l_of(l), logits, kl, t_shift, t_log_z);
  static_cast<float*>(p.kl)[r] = kl;
  float* stats = static_cast<float*>(p.stats) + 2 * r;
  float* tstats = static_cast<float*>(p.tstats) + 2 * r;
  stats[0] = shift_of(m);
  stats[1] = log_l_of(l);
  tstats[0] = t_shift;
  tstats[1] = t_log_z;
}

// The gradient factors of row r (see kl_grad_row), from the saved target statistics.
__device__ __forceinline__ KLGradRow<float> grad_row_of(const KLParams& p, int64_t r, float g, bool logits) {
  const float* tstats = static_cast<const float*>(p.tstats) + 2 * r;
  return kl_grad_row(g, tstats[0], tstats[1], logits);
}

__device__ __forceinline__ bool kept(const KLParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (i >= p.M || j >= p.N) return false;
  return p.key_mask.ptr == nullptr || ldf(p.key_mask.ptr, off4(p.key_mask, b, h, i, j), p.key_mask.dtype) != 0.0f;
}

__device__ __forceinline__ float grad_of(const KLParams& p, int64_t b, int64_t h, int64_t i) {
  return ldf(p.grad_kl.ptr, b * p.grad_kl.s[0] + h * p.grad_kl.s[1] + i * p.grad_kl.s[2], p.grad_kl.dtype);
}

__global__ void __launch_bounds__(kThreads) kl_fwd_kernel(const KLParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (r >= p.B * p.H * p.M) return;  // whole warp: no block-level synchronisation below
  const int64_t b = r / (p.H * p.M), h = (r / p.M) % p.H, i = r % p.M;
  const bool logits = p.target_is_logits;
  const float s_scale2 = float(p.student_scale), t_scale2 = float(p.target_scale);
  float m = ninf(), l = 0.0f;
  KLSums<float> st = kl_init<float>(logits);
  for (int64_t j0 = 0; j0 < p.N; j0 += kWarp * kE) {
    float s2[kE], tg[kE];
    bool keep[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int64_t j = j0 + e * kWarp + lane;
      keep[e] = kept(p, b, h, i, j);
      s2[e] = keep[e] ? ldf(p.logits.ptr, off4(p.logits, b, h, i, j), p.logits.dtype) * s_scale2 : ninf();
      tg[e] = j < p.N ? ldf(p.target.ptr, off4(p.target, b, h, i, j), p.target.dtype) : 0.0f;
    }
    kl_tile_step<kE>(m, l, st, s2, tg, keep, t_scale2, logits);
  }
  if (lane == 0) store_row_stats(p, r, m, l, st, logits);
}

__global__ void __launch_bounds__(kThreads) kl_bwd_kernel(const KLParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (r >= p.B * p.H * p.M) return;
  const int64_t b = r / (p.H * p.M), h = (r / p.M) % p.H, i = r % p.M;
  const bool logits = p.target_is_logits;
  const float s_scale2 = float(p.student_scale), t_scale2 = float(p.target_scale);
  const KLGradRow<float> row = grad_row_of(p, r, grad_of(p, b, h, i) * float(p.student_scale), logits);
  const float m = static_cast<const float*>(p.stats)[2 * r], log_l = static_cast<const float*>(p.stats)[2 * r + 1];
  for (int64_t j = lane; j < p.N; j += kWarp) {
    const bool keep = kept(p, b, h, i, j);
    const float s2 = keep ? ldf(p.logits.ptr, off4(p.logits, b, h, i, j), p.logits.dtype) * s_scale2 : ninf();
    const float tg = ldf(p.target.ptr, off4(p.target, b, h, i, j), p.target.dtype);
    const float ds = kl_dscore(prob_of(s2, m, log_l), tg, keep, row, t_scale2, logits);
    stf(p.dlogits.ptr, off4(p.dlogits, b, h, i, j), p.dlogits.dtype, ds);
  }
}

// ---- attention_kl_qk ----------------------------------------------------------------------

struct QKHeads {
  int64_t b, h, hk, ht, htk;
};

__device__ __forceinline__ QKHeads heads_of(const KLParams& p, int64_t b, int64_t h) {
  QKHeads x;
  x.b = b;
  x.h = h;
  x.hk = h / (p.H / p.Hkv);
  x.ht = p.Ht == p.H ? h : 0;
  x.htk = x.ht / (p.Ht / p.Htk);
  return x;
}

// Student scores (s) and raw target values (tg) of the warp's rows against the key tile;
// keys not kept get s = -inf.
__device__ __forceinline__ void qk_tile(float (&s)[kRPW], float (&tg)[kRPW], bool (&keep)[kRPW], const KLParams& p,
                                        const QKHeads& x, const float* Qw, const float* Ks, const float* Qtw,
                                        const float* Kts, int64_t i0, int64_t j0) {
  const int lane = threadIdx.x & 31;
  const int D = p.D, Dt = p.Dt;
#pragma unroll
  for (int r = 0; r < kRPW; ++r) s[r] = tg[r] = 0.0f;
  const float* kr = Ks + lane * (D + 1);
  for (int d = 0; d < D; ++d) {
    const float kv = kr[d];
#pragma unroll
    for (int r = 0; r < kRPW; ++r) s[r] += Qw[r * D + d] * kv;
  }
  if (p.implicit) {
    const float* ktr = Kts + lane * (Dt + 1);
    for (int d = 0; d < Dt; ++d) {
      const float kv = ktr[d];
#pragma unroll
      for (int r = 0; r < kRPW; ++r) tg[r] += Qtw[r * Dt + d] * kv;
    }
  }
  const int64_t j = j0 + lane;
#pragma unroll
  for (int r = 0; r < kRPW; ++r) {
    const int64_t i = i0 + r;
    keep[r] = kept(p, x.b, x.h, i, j);
    s[r] = keep[r] ? s[r] : ninf();
    if (!p.implicit)
      tg[r] = (i < p.M && j < p.N) ? ldf(p.target.ptr, off4(p.target, x.b, x.h, i, j), p.target.dtype) : 0.0f;
  }
}

// Shared-memory layout of the qk forward / dq blocks: Qs (kBM x D, scaled), Ks (kBN x (D + 1)),
// Qts (kBM x Dt), Kts (kBN x (Dt + 1)).
struct QKSmem {
  float *Qs, *Ks, *Qts, *Kts;
};

__device__ __forceinline__ QKSmem qk_smem(float* smem, const KLParams& p) {
  QKSmem s;
  s.Qs = smem;
  s.Ks = s.Qs + kBM * p.D;
  s.Qts = s.Ks + kBN * (p.D + 1);
  s.Kts = s.Qts + (p.implicit ? kBM * p.Dt : 0);
  return s;
}

__global__ void __launch_bounds__(kThreads) kl_qk_fwd_kernel(const KLParams p, int64_t nmb) {
  LFI_DYNAMIC_SMEM(smem);
  const QKSmem sm = qk_smem(smem, p);
  const int64_t pid = blockIdx.x, mb = pid % nmb, bh = pid / nmb;
  const QKHeads x = heads_of(p, bh / p.H, bh % p.H);
  const int warp = threadIdx.x >> 5;
  const int64_t r0 = mb * kBM, i0 = r0 + warp * kRPW;
  const bool logits = p.target_is_logits || p.implicit;
  const float t_scale2 = float(p.target_scale);
  load_rows(sm.Qs, p.q, x.b, x.h, r0, kBM, p.D, p.D, p.M, float(p.student_scale));
  if (p.implicit) load_rows(sm.Qts, p.q_t, x.b, x.ht, r0, kBM, p.Dt, p.Dt, p.M, 1.0f);
  float m[kRPW], l[kRPW];
  KLSums<float> st[kRPW];
#pragma unroll
  for (int r = 0; r < kRPW; ++r) {
    m[r] = ninf();
    l[r] = 0.0f;
    st[r] = kl_init<float>(logits);
  }
  for (int64_t j0 = 0; j0 < p.N; j0 += kBN) {
    __syncthreads();
    load_rows(sm.Ks, p.k, x.b, x.hk, j0, kBN, p.D, p.D + 1, p.N, 1.0f);
    if (p.implicit) load_rows(sm.Kts, p.k_t, x.b, x.htk, j0, kBN, p.Dt, p.Dt + 1, p.N, 1.0f);
    __syncthreads();
    float s[kRPW], tg[kRPW];
    bool keep[kRPW];
    qk_tile(s, tg, keep, p, x, sm.Qs + warp * kRPW * p.D, sm.Ks, sm.Qts + warp * kRPW * p.Dt, sm.Kts, i0, j0);
#pragma unroll
    for (int r = 0; r < kRPW; ++r) {
      const float s1[1] = {s[r]}, t1[1] = {tg[r]};
      const bool k1[1] = {keep[r]};
      kl_tile_step<1>(m[r], l[r], st[r], s1, t1, k1, t_scale2, logits);
    }
  }
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int r = 0; r < kRPW; ++r)
      if (i0 + r < p.M) store_row_stats(p, bh * p.M + i0 + r, m[r], l[r], st[r], logits);
  }
}

__device__ __forceinline__ KLGradRow<float> qk_grad_row(const KLParams& p, int64_t b, int64_t h, int64_t i,
                                                        bool logits) {
  if (i >= p.M) return KLGradRow<float>{0.0f, 0.0f, 0.0f, 0.0f};
  return grad_row_of(p, (b * p.H + h) * p.M + i, grad_of(p, b, h, i), logits);
}

template <int DL>
__global__ void __launch_bounds__(kThreads) kl_qk_dq_kernel(const KLParams p, int64_t nmb) {
  LFI_DYNAMIC_SMEM(smem);
  const QKSmem sm = qk_smem(smem, p);
  const int64_t pid = blockIdx.x, mb = pid % nmb, bh = pid / nmb;
  const QKHeads x = heads_of(p, bh / p.H, bh % p.H);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r0 = mb * kBM, i0 = r0 + warp * kRPW;
  const bool logits = p.target_is_logits || p.implicit;
  const float t_scale2 = float(p.target_scale);
  const int D = p.D;
  load_rows(sm.Qs, p.q, x.b, x.h, r0, kBM, D, D, p.M, float(p.student_scale));
  if (p.implicit) load_rows(sm.Qts, p.q_t, x.b, x.ht, r0, kBM, p.Dt, p.Dt, p.M, 1.0f);
  const float* stats = static_cast<const float*>(p.stats);
  float sh[kRPW], logl[kRPW], dq[kRPW][DL];
  KLGradRow<float> klr[kRPW];
#pragma unroll
  for (int r = 0; r < kRPW; ++r) {
    const int64_t i = i0 + r;
    sh[r] = i < p.M ? stats[2 * (bh * p.M + i)] : 0.0f;
    logl[r] = i < p.M ? stats[2 * (bh * p.M + i) + 1] : pos_inf<float>();
    klr[r] = qk_grad_row(p, x.b, x.h, i, logits);
#pragma unroll
    for (int c = 0; c < DL; ++c) dq[r][c] = 0.0f;
  }
  for (int64_t j0 = 0; j0 < p.N; j0 += kBN) {
    __syncthreads();
    load_rows(sm.Ks, p.k, x.b, x.hk, j0, kBN, D, D + 1, p.N, 1.0f);
    if (p.implicit) load_rows(sm.Kts, p.k_t, x.b, x.htk, j0, kBN, p.Dt, p.Dt + 1, p.N, 1.0f);
    __syncthreads();
    float s[kRPW], tg[kRPW];
    bool keep[kRPW];
    qk_tile(s, tg, keep, p, x, sm.Qs + warp * kRPW * D, sm.Ks, sm.Qts + warp * kRPW * p.Dt, sm.Kts, i0, j0);
#pragma unroll
    for (int r = 0; r < kRPW; ++r) s[r] = kl_dscore(prob_of(s[r], sh[r], logl[r]), tg[r], keep[r], klr[r], t_scale2, logits);
    add_ds_k(dq, s, sm.Ks, D, lane);
  }
  store_warp_rows(p.dq, dq, x.b, x.h, i0, p.M, D, float(p.student_scale), lane);
}

template <int DL>
__global__ void __launch_bounds__(kThreads) kl_qk_dk_kernel(const KLParams p, int64_t nnb) {
  LFI_DYNAMIC_SMEM(smem);
  const int D = p.D, Dt = p.Dt;
  float* Ks = smem;                                   // kBNK x D
  float* Qs = Ks + kBNK * D;                          // kBMR x (D + 1)
  float* Kts = Qs + kBMR * (D + 1);                   // kBNK x Dt
  float* Qts = Kts + (p.implicit ? kBNK * Dt : 0);    // kBMR x (Dt + 1)
  float* shs = Qts + (p.implicit ? kBMR * (Dt + 1) : 0);  // kBMR each: m, log l, KLGradRow fields
  float* logls = shs + kBMR;
  float* klg = logls + kBMR;
  float* klz = klg + kBMR;
  float* kltsh = klz + kBMR;
  float* kltlz = kltsh + kBMR;
  const int64_t pid = blockIdx.x, nb = pid % nnb, bhk = pid / nnb;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv, G = p.H / p.Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n0 = nb * kBNK;
  const bool logits = p.target_is_logits || p.implicit;
  const float s_scale2 = float(p.student_scale), t_scale2 = float(p.target_scale);
  load_rows(Ks, p.k, b, hk, n0, kBNK, D, D, p.N, 1.0f);
  float dk[kKPW][DL];
#pragma unroll
  for (int kk = 0; kk < kKPW; ++kk)
#pragma unroll
    for (int c = 0; c < DL; ++c) dk[kk][c] = 0.0f;
  const float* stats = static_cast<const float*>(p.stats);
  int64_t loaded_htk = -1;
  for (int64_t g = 0; g < G; ++g) {
    const QKHeads x = heads_of(p, b, hk * G + g);
    const int64_t bh = b * p.H + x.h;
    for (int64_t i0 = 0; i0 < p.M; i0 += kBMR) {
      __syncthreads();
      if (p.implicit && x.htk != loaded_htk) {
        load_rows(Kts, p.k_t, b, x.htk, n0, kBNK, Dt, Dt, p.N, 1.0f);
        loaded_htk = x.htk;
      }
      load_rows(Qs, p.q, b, x.h, i0, kBMR, D, D + 1, p.M, 1.0f);
      if (p.implicit) load_rows(Qts, p.q_t, b, x.ht, i0, kBMR, Dt, Dt + 1, p.M, 1.0f);
      load_stats(shs, stats, bh * p.M, i0, kBMR, p.M, 2, 0, 0.0f);
      load_stats(logls, stats, bh * p.M, i0, kBMR, p.M, 2, 1, pos_inf<float>());
      for (int r = threadIdx.x; r < kBMR; r += blockDim.x) {
        const KLGradRow<float> kr = qk_grad_row(p, b, x.h, i0 + r, logits);
        klg[r] = kr.g;
        klz[r] = kr.inv_z;
        kltsh[r] = kr.t_shift;
        kltlz[r] = kr.t_log_z;
      }
      __syncthreads();
      float s[kKPW], u[kKPW];
#pragma unroll
      for (int kk = 0; kk < kKPW; ++kk) s[kk] = u[kk] = 0.0f;
      lane_dots(s, Qs, Ks, D, lane, warp);
      if (p.implicit) lane_dots(u, Qts, Kts, Dt, lane, warp);
      const int64_t i = i0 + lane;
      const KLGradRow<float> klr{klg[lane], klz[lane], kltsh[lane], kltlz[lane]};
      float ds[kKPW];
#pragma unroll
      for (int kk = 0; kk < kKPW; ++kk) {
        const int64_t j = n0 + warp * kKPW + kk;
        const bool keep = kept(p, b, x.h, i, j);
        const float s2 = keep ? s[kk] * s_scale2 : ninf();
        const float tg = p.implicit ? u[kk]
                                    : ((i < p.M && j < p.N) ? ldf(p.target.ptr, off4(p.target, b, x.h, i, j),
                                                                  p.target.dtype)
                                                            : 0.0f);
        ds[kk] = kl_dscore(prob_of(s2, shs[lane], logls[lane]), tg, keep, klr, t_scale2, logits);
      }
      for (int ii = 0; ii < kBMR; ++ii) {
        const float* q_ii = Qs + ii * (D + 1);
#pragma unroll
        for (int kk = 0; kk < kKPW; ++kk) {
          const float dsv = __shfl_sync(kFull, ds[kk], ii);
#pragma unroll
          for (int c = 0; c < DL; ++c) {
            const int e = lane + c * kWarp;
            if (e < D) dk[kk][c] += dsv * q_ii[e];
          }
        }
      }
    }
  }
  const float sc = float(p.student_scale);
#pragma unroll
  for (int kk = 0; kk < kKPW; ++kk) {
    const int64_t j = n0 + warp * kKPW + kk;
    if (j >= p.N) continue;
#pragma unroll
    for (int c = 0; c < DL; ++c) {
      const int e = lane + c * kWarp;
      if (e < D) stf(p.dk.ptr, off4(p.dk, b, hk, j, e), p.dk.dtype, dk[kk][c] * sc);
    }
  }
}

}  // namespace
}  // namespace cuda_k

namespace cuda {

using namespace cuda_k;

const char* kl_forward(const KLParams& p, void* stream_) {
  const int64_t rows = p.B * p.H * p.M;
  if (rows == 0) return nullptr;
  LFI_LAUNCH(kl_fwd_kernel, (rows + kWarps - 1) / kWarps, kThreads, 0, static_cast<cudaStream_t>(stream_), p);
  return check_launch();
}

const char* kl_backward(const KLParams& p, void* stream_) {
  const int64_t rows = p.B * p.H * p.M;
  if (rows == 0) return nullptr;
  LFI_LAUNCH(kl_bwd_kernel, (rows + kWarps - 1) / kWarps, kThreads, 0, static_cast<cudaStream_t>(stream_), p);
  return check_launch();
}

static size_t qk_smem_bytes(const KLParams& p) {
  return sizeof(float) * (kBM * p.D + kBN * (p.D + 1) + (p.implicit ? kBM * p.Dt + kBN * (p.Dt + 1) : 0));
}

const char* kl_qk_forward(const KLParams& p, void* stream_) {
  const int64_t nmb = (p.M + kBM - 1) / kBM;
  const int64_t grid = p.B * p.H * nmb;
  if (grid == 0) return nullptr;
  const size_t smem = qk_smem_bytes(p);
  LFI_CUDA_TRY(prepare(kl_qk_fwd_kernel, smem));
  LFI_LAUNCH(kl_qk_fwd_kernel, grid, kThreads, smem, static_cast<cudaStream_t>(stream_), p, nmb);
  return check_launch();
}

const char* kl_qk_backward(const KLParams& p, void* stream_) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const int64_t nmb = (p.M + kBM - 1) / kBM;
  const int64_t grid_m = p.B * p.H * nmb;
  if (grid_m == 0) return nullptr;
  const int dl = lanes_for(p.D);
  LFI_DISPATCH_DL(dl, DLC, {
    const size_t smem = qk_smem_bytes(p);
    LFI_CUDA_TRY(prepare(kl_qk_dq_kernel<DLC>, smem));
    LFI_LAUNCH(kl_qk_dq_kernel<DLC>, grid_m, kThreads, smem, stream, p, nmb);
  })
  if (const char* e = check_launch()) return e;
  const int64_t nnb = (p.N + kBNK - 1) / kBNK;
  LFI_DISPATCH_DL(dl, DLC, {
    const size_t smem = sizeof(float) * (kBNK * p.D + kBMR * (p.D + 1) +
                                         (p.implicit ? kBNK * p.Dt + kBMR * (p.Dt + 1) : 0) + 6 * kBMR);
    LFI_CUDA_TRY(prepare(kl_qk_dk_kernel<DLC>, smem));
    LFI_LAUNCH(kl_qk_dk_kernel<DLC>, p.B * p.Hkv * nnb, kThreads, smem, stream, p, nnb);
  })
  return check_launch();
}

}  // namespace cuda
}  // namespace lfi
