// CUDA kernels of attention_kl (dense student logits) and attention_kl_qk (student logits
// q k^T * scale, teacher logits q_t k_t^T * scale_t computed tile by tile), sm_80+, float32 math
// (accumulation and statistics).
//
// attention_kl: one warp per row, 128-key tiles (4 keys per lane); per tile the row state of
// lfi_math.h is rescaled to the tile's maxima and the lanes' partial sums are warp-reduced.
// attention_kl takes precomputed logits: no matrix product, so CUDA cores are right for it.
// attention_kl_qk, float32 (and D or Dt > 128, or a teacher of another dtype than q): the layout of
// the attention kernels (attention.cu): forward and dq with one block per (16 query rows, b, h) and
// 32-key tiles in shared memory; dk with one block per (16 keys, b, kv head) looping over the
// group's heads and 32-row tiles (no atomics). bf16 / fp16 with D, Dt <= 128: tensor cores (the
// second half of this file, on the building blocks of tc_tiles.cuh).
#include "../lfi_kernels.h"
#include "tc_tiles.cuh"

namespace lfi {
namespace cuda_k {
namespace {

constexpr int kE = 4;  // keys per lane per tile in the dense row kernels

__device__ __forceinline__ float ninf() { return neg_inf<float>(); }

// Folds E keys per lane of one row into its state; the row's keys are spread over groups of LANES
// lanes (32: the whole warp; 4: the quad of a tensor-core accumulator row), every lane of the group
// holds the same state afterwards.
template <int E, int LANES = kWarp>
__device__ __forceinline__ void kl_tile_step(float& m, float& l, KLSums<float>& st, const float (&s2)[E],
                                             const float (&tg)[E], const bool (&keep)[E], float t_scale2,
                                             bool logits) {
  float tmax = s2[0];
#pragma unroll
  for (int e = 1; e < E; ++e) tmax = fmaxf(tmax, s2[e]);
  const float sh_old = shift_of(m);
  softmax_rescale(m, l, lanes_max<LANES>(tmax));
  const float sh = shift_of(m);
  float ps = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) ps += exp_(s2[e] - sh);
  l += lanes_sum<LANES>(ps);
  float mu_new = 0.0f;
  if (logits) {
    float umax = ninf();
#pragma unroll
    for (int e = 0; e < E; ++e) umax = fmaxf(umax, kl_u(tg[e], keep[e], t_scale2));
    mu_new = fmaxf(st.y, lanes_max<LANES>(umax));
  }
  kl_rescale(st, sh_old, sh, mu_new, logits);
  const float shu = logits ? shift_of(st.y) : 0.0f;
  KLSums<float> part = kl_zero<float>();
#pragma unroll
  for (int e = 0; e < E; ++e) kl_add(part, s2[e], tg[e], keep[e], sh, shu, t_scale2, logits);
  kl_merge(st, lanes_sum<LANES>(part), logits);
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

// One score of row i, key j: the student logit s2 (s, or -inf for a key not kept), the raw target
// value tg (the teacher's product u for an implicit teacher, else the dense target; 0 out of range).
struct QKElem {
  float s2, tg;
  bool keep;
};

__device__ __forceinline__ QKElem qk_element(const KLParams& p, int64_t b, int64_t h, int64_t i, int64_t j, float s,
                                             float u) {
  QKElem e;
  e.keep = kept(p, b, h, i, j);
  e.s2 = e.keep ? s : ninf();
  e.tg = p.implicit ? u
                    : ((i < p.M && j < p.N) ? ldf(p.target.ptr, off4(p.target, b, h, i, j), p.target.dtype) : 0.0f);
  return e;
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
  add_row_dots(s, Qw, Ks + lane * (D + 1), D);
  if (p.implicit) add_row_dots(tg, Qtw, Kts + lane * (Dt + 1), Dt);
#pragma unroll
  for (int r = 0; r < kRPW; ++r) {
    const QKElem e = qk_element(p, x.b, x.h, i0 + r, j0 + lane, s[r], tg[r]);
    s[r] = e.s2;
    tg[r] = e.tg;
    keep[r] = e.keep;
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
  init_rows(m, l, st, logits);
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
  float sh[kRPW], logl[kRPW], dq[kRPW][DL];
  KLGradRow<float> klr[kRPW];
#pragma unroll
  for (int r = 0; r < kRPW; ++r) {
    const int64_t i = i0 + r;
    row_stats(p.stats, bh, p.M, i, sh[r], logl[r]);
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
    add_outer(dq, s, sm.Ks, D + 1, kBN, D, lane);  // dQ += dS K
  }
  store_warp_rows(p.dq, dq, x.b, x.h, i0, p.M, D, float(p.student_scale), lane);
}

template <int DL>
__global__ void __launch_bounds__(kThreads, 2) kl_qk_dk_kernel(const KLParams p, int64_t nnb) {
  LFI_DYNAMIC_SMEM(smem);
  const int D = p.D, Dt = p.Dt;
  float* Ks = smem;                                   // kBNK x D
  float* Qs = Ks + kBNK * D;                          // kBMR x (D + 1)
  float* Kts = Qs + kBMR * (D + 1);                   // kBNK x Dt
  float* Qts = Kts + (p.implicit ? kBNK * Dt : 0);    // kBMR x (Dt + 1)
  float* shs = Qts + (p.implicit ? kBMR * (Dt + 1) : 0);  // kBMR each: m, log l, KLGradRow fields
  float* logls = shs + kBMR;
  float* klrows = logls + kBMR;  // 4 x kBMR (put_kl_row)
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
      for (int r = threadIdx.x; r < kBMR; r += blockDim.x) put_kl_row(klrows, kBMR, r, qk_grad_row(p, b, x.h, i0 + r, logits));
      __syncthreads();
      float s[kKPW], u[kKPW] = {};
      lane_dots(s, Qs, Ks, D, lane, warp);
      if (p.implicit) lane_dots(u, Qts, Kts, Dt, lane, warp);
      const int64_t i = i0 + lane;
      const KLGradRow<float> klr = get_kl_row(klrows, kBMR, lane);
      float ds[kKPW];
#pragma unroll
      for (int kk = 0; kk < kKPW; ++kk) {
        const QKElem e = qk_element(p, b, x.h, i, n0 + warp * kKPW + kk, s[kk] * s_scale2, u[kk]);
        ds[kk] = kl_dscore(prob_of(e.s2, shs[lane], logls[lane]), e.tg, e.keep, klr, t_scale2, logits);
      }
      add_outer(dk, ds, Qs, D + 1, kBMR, D, lane);  // dK += dS^T Q
    }
  }
  store_warp_rows(p.dk, dk, b, hk, n0 + warp * kKPW, p.N, D, float(p.student_scale), lane);
}

}  // namespace
}  // namespace cuda_k

// ---- attention_kl_qk on tensor cores ---------------------------------------------------------
// bf16 / fp16 q, k (and q_t, k_t for an implicit teacher, same dtype) with D, Dt <= 128, sm_80+:
// the layout of attention_tc.cu and its building blocks (tc_tiles.cuh). DP, the padded head dim,
// covers D and Dt. Forward and dq: one block of 4 warps per (64 query rows, b, h), each warp owning
// 16 rows; Q (and Q_t) staged once, K (and K_t) tiles of 64 keys double-buffered with cp.async.
// Per tile and warp: S = Q K^T (and U = Q_t K_t^T) in accumulator registers, then the row state
// of kl_tile_step over the quad of lanes sharing a row (forward), or dS = kl_dscore and
// dQ += dS K with dS packed to b16 in place (dq). dk: one block per (64 keys, b, kv head) looping
// over the group's heads and 64-row query tiles (Q, Q_t and the rows' statistics double-buffered,
// K_t restaged per head into a buffer of its own), S^T = K Q^T, dS^T, dK += dS^T Q: no atomics.
// The element-wise math is the CUDA-core kernels' (qk_element, kl_tile_step, kl_dscore).
namespace tc {
namespace {

using namespace ::lfi::cuda_k;

// Per query row of a staged dk tile: m, log l and the KLGradRow fields g, 1 / Z, t_shift, t_log_z.
constexpr int kQKRowVals = 6;

template <int DP>
struct QKTcShape {
  static constexpr int LD = DP + 8;
  static constexpr int NT = 8;        // accumulator tiles of a 64-key (or 64-query) tile
  static constexpr int OT = DP / 8;   // accumulator tiles of dQ / dK
  // dk holds OT x 4 accumulators; past DP = 64 the 64-query tile is taken in halves of 32 so that
  // S^T and U^T fit beside them.
  static constexpr int QH = DP <= 64 ? 64 : 32;
};

// Forward and dq of one (64 query rows, b, h) block. DQ: the dq kernel, else the forward.
template <typename T, int DP, bool DQ>
__device__ __forceinline__ void kl_qk_rows_tc(const KLParams& p, int64_t nmb) {
  using S = QKTcShape<DP>;
  constexpr int LD = S::LD, NT = S::NT, OT = S::OT;
  LFI_DYNAMIC_SMEM(smem_f);
  T* Qs = reinterpret_cast<T*>(smem_f);
  T* Ks = Qs + 64 * LD;    // two buffers
  T* Qts = Ks + 128 * LD;  // implicit teacher only: Q_t, then K_t (two buffers)
  T* Kts = Qts + 64 * LD;

  const int64_t pid = blockIdx.x, mb = pid % nmb, bh = pid / nmb;
  const QKHeads x = heads_of(p, bh / p.H, bh % p.H);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t r0 = mb * 64;
  const bool logits = p.target_is_logits || p.implicit;
  const float s_scale = static_cast<float>(p.student_scale), t_scale = static_cast<float>(p.target_scale);
  const RowSource<T> ksrc = row_source<T>(p.k, x.b, x.hk);
  const RowSource<T> ktsrc = p.implicit ? row_source<T>(p.k_t, x.b, x.htk) : ksrc;
  const int64_t ntiles = (p.N + 63) / 64;
  const bool full_ok = ksrc.vec && p.D % 8 == 0 && (!p.implicit || (ktsrc.vec && p.Dt % 8 == 0));
  const int64_t nfull = full_ok ? p.N / 64 : 0;

  zero_padding<T, DP, LD>(Ks, 128, p.D);
  if (p.implicit) zero_padding<T, DP, LD>(Kts, 128, p.Dt);
  stage_rows<T, 64, DP, LD>(Qs, row_source<T>(p.q, x.b, x.h), r0, p.M, p.D);
  if (p.implicit) stage_rows<T, 64, DP, LD>(Qts, row_source<T>(p.q_t, x.b, x.ht), r0, p.M, p.Dt);
  cp_async_commit();
  auto stage = [&](int64_t tile) {
    stage_kv<T, DP, LD>(Ks, p.implicit ? Kts : nullptr, ksrc, ktsrc, tile, tile < nfull, p.N, p.D, p.Dt);
  };

  // The lane's rows g and g + 8 of the warp's 16: forward state, or (dq) statistics and KL factors.
  int64_t row[2];
  float m[2], l[2];
  KLSums<float> st[2];
  KLGradRow<float> klr[2];
  init_rows(m, l, st, logits);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t i = r0 + warp * 16 + g + 8 * rr;
    row[rr] = i;
    if constexpr (DQ) {  // m = shift, l = log l of the saved statistics
      row_stats(p.stats, bh, p.M, i, m[rr], l[rr]);
      klr[rr] = qk_grad_row(p, x.b, x.h, i, logits);
    }
  }
  float dq[DQ ? OT : 1][4];
  zero_acc(dq);

  if (ntiles > 0) stage(0);
  for (int64_t it = 0; it < ntiles; ++it) {
    pipeline_advance(stage, it, ntiles);
    const int buf = static_cast<int>(it & 1);
    const T* Kt = Ks + buf * 64 * LD;
    float s[NT][4], u[NT][4];
    zero_acc(s);
    zero_acc(u);
    mma_abt<T, DP, LD, NT>(s, Qs + warp * 16 * LD, Kt, lane);  // Q K^T
    if (p.implicit) mma_abt<T, DP, LD, NT>(u, Qts + warp * 16 * LD, Kts + buf * 64 * LD, lane);  // Q_t K_t^T
    // Element (nt, e): row row[e / 2], key j0 + nt * 8 + 2 t4 + e % 2.
    const int64_t j0 = it * 64;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float s2[2 * NT], tg[2 * NT];
      bool keep[2 * NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = 2 * rr + c;
          const QKElem el = qk_element(p, x.b, x.h, row[rr], j0 + nt * 8 + 2 * t4 + c, s[nt][e] * s_scale, u[nt][e]);
          if constexpr (DQ) {
            s[nt][e] = kl_dscore(prob_of(el.s2, m[rr], l[rr]), el.tg, el.keep, klr[rr], t_scale, logits);
          } else {
            s2[2 * nt + c] = el.s2;
            tg[2 * nt + c] = el.tg;
            keep[2 * nt + c] = el.keep;
          }
        }
      if constexpr (!DQ) kl_tile_step<2 * NT, 4>(m[rr], l[rr], st[rr], s2, tg, keep, t_scale, logits);
    }
    if constexpr (DQ) mma_xb<T, DP, LD, NT>(dq, s, Kt, lane);  // dQ += dS K
    __syncthreads();  // every warp is done with this buffer before it is staged again
  }
  cp_async_wait<0>();  // the Q group when there is no key tile

  if constexpr (DQ) {
    store_acc_rows(p.dq, dq, x.b, x.h, r0 + warp * 16, p.M, p.D, s_scale, lane);
  } else {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)
      if (t4 == 0 && row[rr] < p.M) store_row_stats(p, bh * p.M + row[rr], m[rr], l[rr], st[rr], logits);
  }
}

// (128, 2) / (128, 1): up to 255 registers, no spills (ptxas's own choice may aim at more blocks).
template <typename T, int DP>
__global__ void __launch_bounds__(kTcThreads, 2) kl_qk_fwd_tc_kernel(const KLParams p, int64_t nmb) {
  kl_qk_rows_tc<T, DP, false>(p, nmb);
}

template <typename T, int DP>
__global__ void __launch_bounds__(kTcThreads, 1) kl_qk_dq_tc_kernel(const KLParams p, int64_t nmb) {
  kl_qk_rows_tc<T, DP, true>(p, nmb);
}

template <typename T, int DP>
__global__ void __launch_bounds__(kTcThreads, 1) kl_qk_dk_tc_kernel(const KLParams p, int64_t nnb) {
  using S = QKTcShape<DP>;
  constexpr int LD = S::LD, OT = S::OT, QH = S::QH, NH = QH / 8;
  LFI_DYNAMIC_SMEM(smem_f);
  float* rowv = smem_f;                                              // [2][kQKRowVals][64]
  T* Ks = reinterpret_cast<T*>(rowv + 2 * kQKRowVals * 64);
  T* Qs = Ks + 64 * LD;    // two buffers
  T* Qts = Qs + 128 * LD;  // implicit teacher only: Q_t (two buffers), K_t (two buffers, by head parity)
  T* Kts = Qts + 128 * LD;

  const int64_t pid = blockIdx.x, nb = pid % nnb, bhk = pid / nnb;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv, G = p.H / p.Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g4 = lane >> 2;
  const int64_t n0 = nb * 64;
  const bool logits = p.target_is_logits || p.implicit;
  const float s_scale = static_cast<float>(p.student_scale), t_scale = static_cast<float>(p.target_scale);

  zero_padding<T, DP, LD>(Qs, 128, p.D);
  if (p.implicit) {
    zero_padding<T, DP, LD>(Qts, 128, p.Dt);
    zero_padding<T, DP, LD>(Kts, 128, p.Dt);
  }
  stage_rows<T, 64, DP, LD>(Ks, row_source<T>(p.k, b, hk), n0, p.N, p.D);
  cp_async_commit();

  const int64_t nq = (p.M + 63) / 64, nq_full = p.M / 64, ntot = G * nq;
  const bool vec = row_source<T>(p.q, b, hk * G).vec && p.D % 8 == 0 && p.q.s[1] % 8 == 0 &&
                   (!p.implicit || (row_source<T>(p.q_t, b, 0).vec && p.Dt % 8 == 0 && p.q_t.s[1] % 8 == 0));
  // Tile `it`: head hk * G + it / nq, rows (it % nq) * 64, into buffer it & 1 (K_t of the head, at its
  // first tile, into buffer (it / nq) & 1: the previous head's K_t stays in use until its last tile).
  auto stage = [&](int64_t it) {
    const int64_t gg = it / nq, qt = it - gg * nq, h = hk * G + gg, i0 = qt * 64, bh = b * p.H + h;
    const int buf = static_cast<int>(it & 1);
    const QKHeads x = heads_of(p, b, h);
    const bool full = vec && qt < nq_full;
    stage_tile<T, 64, DP, LD>(Qs + buf * 64 * LD, row_source<T>(p.q, b, h), i0, p.M, p.D, full);
    if (p.implicit) {
      stage_tile<T, 64, DP, LD>(Qts + buf * 64 * LD, row_source<T>(p.q_t, b, x.ht), i0, p.M, p.Dt, full);
      if (qt == 0) stage_rows<T, 64, DP, LD>(Kts + (gg & 1) * 64 * LD, row_source<T>(p.k_t, b, x.htk), n0, p.N, p.Dt);
    }
    cp_async_commit();
    if (threadIdx.x < 64) {  // plain stores: visible after the barrier that precedes their use
      const int r = static_cast<int>(threadIdx.x);
      const int64_t i = i0 + r;
      float* rv = rowv + buf * kQKRowVals * 64;
      row_stats(p.stats, bh, p.M, i, rv[r], rv[64 + r]);
      put_kl_row(rv + 2 * 64, 64, r, qk_grad_row(p, b, h, i, logits));
    }
  };

  float dk[OT][4];
  zero_acc(dk);
  int64_t jrow[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) jrow[rr] = n0 + warp * 16 + g4 + 8 * rr;

  if (ntot > 0) stage(0);
  for (int64_t it = 0; it < ntot; ++it) {
    pipeline_advance(stage, it, ntot);
    const int buf = static_cast<int>(it & 1);
    const int64_t gg = it / nq, qt = it - gg * nq, h = hk * G + gg, i0 = qt * 64;
    const T* Qt = Qs + buf * 64 * LD;
    const T* Qtt = Qts + buf * 64 * LD;
    const T* Ktt = Kts + (gg & 1) * 64 * LD + warp * 16 * LD;
    const float* rv = rowv + buf * kQKRowVals * 64;
#pragma unroll
    for (int half = 0; half < 64 / QH; ++half) {
      float s[NH][4], u[NH][4];
      zero_acc(s);
      zero_acc(u);
      mma_abt<T, DP, LD, NH>(s, Ks + warp * 16 * LD, Qt + half * QH * LD, lane);         // S^T: keys x queries
      if (p.implicit) mma_abt<T, DP, LD, NH>(u, Ktt, Qtt + half * QH * LD, lane);         // U^T
      // Element (nt, e): key jrow[e / 2], query i0 + c with c = half * QH + nt * 8 + 2 t4 + e % 2.
      for_each_acc<NH>(lane, [&](int nt, int e, int rr, int cc) {
        const int c = half * QH + cc;
        const QKElem el = qk_element(p, b, h, i0 + c, jrow[rr], s[nt][e] * s_scale, u[nt][e]);
        s[nt][e] = kl_dscore(prob_of(el.s2, rv[c], rv[64 + c]), el.tg, el.keep, get_kl_row(rv + 2 * 64, 64, c),
                             t_scale, logits);
      });
      mma_xb<T, DP, LD, NH>(dk, s, Qt + half * QH * LD, lane);  // dK += dS^T Q
    }
    __syncthreads();  // the buffers are free for the stage two tiles ahead
  }
  cp_async_wait<0>();  // the K group when no query tile ran
  store_acc_rows(p.dk, dk, b, hk, n0 + warp * 16, p.N, p.D, s_scale, lane);
}

template <int DP>
constexpr size_t qk_tc_smem(bool dk, bool implicit, size_t elem) {
  // dk: row values, K, Q x 2 (+ Q_t x 2, K_t x 2); forward / dq: Q, K x 2 (+ Q_t, K_t x 2).
  return dk ? sizeof(float) * 2 * kQKRowVals * 64 + elem * (DP + 8) * 64 * (implicit ? 7 : 3)
            : elem * (DP + 8) * 64 * (implicit ? 6 : 3);
}

template <typename Kernel>
const char* launch_qk_tc(Kernel kernel, int64_t grid, size_t smem, cudaStream_t stream, const KLParams& p,
                         int64_t nblocks) {
  if (grid == 0) return nullptr;
  LFI_CUDA_TRY(prepare(kernel, smem));
  LFI_LAUNCH(kernel, grid, kTcThreads, smem, stream, p, nblocks);
  return check_launch();
}

template <typename T, int DP>
const char* kl_qk_forward_tc(const KLParams& p, cudaStream_t stream) {
  const int64_t nmb = (p.M + 63) / 64;
  return launch_qk_tc(kl_qk_fwd_tc_kernel<T, DP>, p.B * p.H * nmb, qk_tc_smem<DP>(false, p.implicit, sizeof(T)),
                      stream, p, nmb);
}

template <typename T, int DP>
const char* kl_qk_backward_tc(const KLParams& p, cudaStream_t stream) {
  const int64_t nmb = (p.M + 63) / 64, nnb = (p.N + 63) / 64;
  if (const char* e = launch_qk_tc(kl_qk_dq_tc_kernel<T, DP>, p.B * p.H * nmb,
                                   qk_tc_smem<DP>(false, p.implicit, sizeof(T)), stream, p, nmb))
    return e;
  return launch_qk_tc(kl_qk_dk_tc_kernel<T, DP>, p.B * p.Hkv * nnb, qk_tc_smem<DP>(true, p.implicit, sizeof(T)),
                      stream, p, nnb);
}

}  // namespace
}  // namespace tc

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

bool kl_qk_tc_applies(const KLParams& p) {
  const int32_t dt = p.q.dtype;
  return (dt == kBF16 || dt == kF16) && p.k.dtype == dt && p.D <= 128 &&
         (!p.implicit || (p.q_t.dtype == dt && p.k_t.dtype == dt && p.Dt <= 128));
}

// Runs tc_launch(TypeTag<T>, DP) for the tensor-core kernels (kl_qk_tc_applies).
template <typename Launch>
static const char* with_qk_tc_config(const KLParams& p, Launch tc_launch) {
  return tc::with_b16_and_head_dim(p.q.dtype, p.implicit && p.Dt > p.D ? p.Dt : p.D, tc_launch);
}

const char* kl_qk_forward(const KLParams& p, void* stream_) {
  if (kl_qk_tc_applies(p)) {  // bf16 / fp16, head dims up to 128: tensor cores
    return with_qk_tc_config(p, [&](auto t, auto dp) {
      return tc::kl_qk_forward_tc<typename decltype(t)::type, decltype(dp)::value>(p, static_cast<cudaStream_t>(stream_));
    });
  }
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
  if (kl_qk_tc_applies(p)) {
    return with_qk_tc_config(p, [&](auto t, auto dp) {
      return tc::kl_qk_backward_tc<typename decltype(t)::type, decltype(dp)::value>(p, stream);
    });
  }
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
