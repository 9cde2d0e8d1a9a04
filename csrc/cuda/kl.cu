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
// over the quad of lanes sharing a row (forward), or dS and dQ += dS K with dS packed to b16 in
// place (dq). dk: one block per (64 keys, b, kv head) looping over the group's heads and 64-row
// query tiles (Q, Q_t and the rows' values double-buffered, K_t restaged per head into a buffer of
// its own), S^T = K Q^T, dS^T, dK += dS^T Q: no atomics.
//
// Each kernel is compiled per target kind TT (template parameter): void = the implicit teacher,
// else the element type of a dense target (q's b16 type or float: loads without a dtype switch),
// and runs separately compiled loop bodies per logit / probability target: FAST over interior
// tiles (no key mask, every key and, in dk, every query in range: no per-element test; the dense
// target read from 64-bit row pointers formed once per row or tile), CHECKED over the others
// (bounds and the key mask per element; ~2 SASS per score against ~0.3-1.1 for FAST, sm_90). The element math is lfi_math.h's (softmax_rescale, kl_rescale,
// kl_finish, the KLSums / KLGradRow conventions) in base 2: scores enter the exponentials as
// x * scale log2 e - shift log2 e (one FFMA and one MUFU.EX2), the probability target's t ln t as
// t lg2 t (MUFU.LG2) times ln 2 per tile.
namespace tc {
namespace {

using namespace ::lfi::cuda_k;

// Floats per query row of a staged dk tile (QKRow).
constexpr int kQKRowVals = 4;

template <int DP>
struct QKTcShape {
  static constexpr int LD = DP + 8;
  static constexpr int NT = 8;        // accumulator tiles of a 64-key (or 64-query) tile
  static constexpr int OT = DP / 8;   // accumulator tiles of dQ / dK
  // dk holds OT x 4 accumulators; past DP = 64 the 64-query tile is taken in halves of 32 so that
  // S^T and U^T fit beside them.
  static constexpr int QH = DP <= 64 ? 64 : 32;
};

constexpr float kL2e = static_cast<float>(kLog2e);
constexpr float kLn2f = static_cast<float>(kLn2);
// Exponents are clamped to this where a -inf would meet a 0 weight (0 * inf = NaN).
constexpr float kFinite = -1e30f;

// The row values of the backward (dq: registers; dk: staged per query row, one 16-byte load):
// (m + log l) log2 e, the KLGradRow's g, and 1 / Z (probabilities) or (t_shift + t_log_z) log2 e
// (logits).
struct alignas(16) QKRow {
  float pexp, g, tz, unused;
};

__device__ __forceinline__ QKRow qk_bwd_row(const KLParams& p, int64_t b, int64_t h, int64_t bh, int64_t i,
                                            bool logits) {
  float m, log_l;
  row_stats(p.stats, bh, p.M, i, m, log_l);
  const KLGradRow<float> k = qk_grad_row(p, b, h, i, logits);
  return QKRow{(m + log_l) * kL2e, k.g, logits ? (k.t_shift + k.t_log_z) * kL2e : k.inv_z, 0.0f};
}

// dS = g (p - t) of one element (kl_dscore in base 2) from the raw products s (and u) and the row
// values r: p = exp2(s scale log2 e - (m + log l) log2 e), t = exp2(u t_scale log2 e - (t_shift +
// t_log_z) log2 e) (logits) or tg / Z (probabilities).
template <bool LOGITS>
__device__ __forceinline__ float qk_dscore(float s, float tg, const QKRow& r, float as, float au) {
  const float pr = ex2(fmaf(s, as, -r.pexp));
  const float t = LOGITS ? ex2(fmaf(tg, au, -r.tz)) : tg * r.tz;
  return r.g * (pr - t);
}

// Folds one 16 x 64 tile of a warp into the online KL state of the lane's rows g, g + 8 (rr):
// softmax_rescale / kl_rescale per row, then the tile's sums. s: raw products q.k; tg: the raw
// target (dense values, or the teacher's raw products q_t.k_t). FAST: every key kept, scale (and
// t_scale for logits) > 0, so the row max of scale * s is scale * max s. CHECKED: keep(nt, e, rr, c)
// per element (bounds, key mask). l, st.x, st.c (and st.y for probabilities) are this lane's partial
// sums, summed over the quad at the end; m (and st.y, the logits' running max) are the quad's.
template <bool LOGITS, bool CHECKED, int NT, typename Keep>
__device__ __forceinline__ void qk_fwd_tile(float (&m)[2], float (&l)[2], KLSums<float> (&st)[2], float (&s)[NT][4],
                                            float (&tg)[NT][4], float s_scale, float t_scale, int lane, Keep&& keep) {
  if constexpr (CHECKED) {  // natural units, -inf (logits) / 0 (probabilities) where not kept
    for_each_acc<NT>(lane, [&](int nt, int e, int rr, int c) {
      const bool k = keep(nt, e, rr, c);
      s[nt][e] = k ? s[nt][e] * s_scale : neg_inf<float>();
      tg[nt][e] = LOGITS ? kl_u(tg[nt][e], k, t_scale) : (k ? tg[nt][e] : 0.0f);
    });
  }
  const float ms = CHECKED ? 1.0f : s_scale, mu = CHECKED ? 1.0f : t_scale;
  float smax[2], umax[2], shl[2], shul[2] = {0.0f, 0.0f};
  acc_row_max(smax, s);
  if constexpr (LOGITS) acc_row_max(umax, tg);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float sh_old = shift_of(m[rr]);
    softmax_rescale(m[rr], l[rr], smax[rr] * ms);
    const float sh = shift_of(m[rr]);
    shl[rr] = sh * kL2e;
    kl_rescale(st[rr], sh_old, sh, LOGITS ? fmaxf(st[rr].y, umax[rr] * mu) : 0.0f, LOGITS);
    if constexpr (LOGITS) shul[rr] = shift_of(st[rr].y) * kL2e;
  }
  const float as = ms * kL2e, au = mu * kL2e;
  float ps[2] = {0.0f, 0.0f}, xs[2] = {0.0f, 0.0f}, ys[2] = {0.0f, 0.0f}, cs[2] = {0.0f, 0.0f};
  for_each_acc<NT>(lane, [&](int nt, int e, int rr, int) {
    const float d2 = fmaf(s[nt][e], as, -shl[rr]);  // (s - sh) log2 e; -inf where not kept
    const float dc = CHECKED ? fmaxf(d2, kFinite) : d2;
    ps[rr] += ex2(d2);
    if constexpr (LOGITS) {  // x += e, c += e ((u - shu) - (s - sh)); e = 0 where not kept or u = -inf
      const float du2 = fmaf(tg[nt][e], au, -shul[rr]);
      const float ev = ex2(du2);
      xs[rr] += ev;
      cs[rr] = fmaf(ev, fmaxf(du2, kFinite) - dc, cs[rr]);
    } else {  // x += t, y += t lg2 t, c += t (s - sh) over t > 0 (tp = 0 otherwise, NaN t stays in x).
      // lg2(t + FLT_MIN): finite at t = 0 (and on subnormals, which lg2.approx.ftz flushes), NaN for
      // a negative t (unchecked on a GPU, see lfi/ops/_kl.py: the row's KL is NaN, as F.kl_div),
      // one FADD as the clamp it replaces (a negative subnormal, |t| < FLT_MIN, counts as 0 here).
      const float t = tg[nt][e], tp = fmaxf(t, 0.0f);
      xs[rr] += t;
      ys[rr] = fmaf(tp, lg2(t + 1.17549435e-38f), ys[rr]);
      cs[rr] = fmaf(tp, dc, cs[rr]);
    }
  });
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    l[rr] += ps[rr];
    st[rr].x += xs[rr];
    st[rr].c = fmaf(cs[rr], kLn2f, st[rr].c);
    if constexpr (!LOGITS) st[rr].y = fmaf(ys[rr], kLn2f, st[rr].y);
  }
}

template <typename TT>
using TargetElem = std::conditional_t<std::is_void<TT>::value, float, TT>;

// Whether the key mask keeps (b, h, i, j), given the mask's offset of (b, h, i). The mask is bool
// (ops.cpp's fill_kl_common turns other dtypes into mask != 0): one byte, no dtype switch.
__device__ __forceinline__ bool mask_keeps(const KLParams& p, int64_t row_off, int64_t j) {
  return p.key_mask.ptr == nullptr || static_cast<const uint8_t*>(p.key_mask.ptr)[row_off + j * p.key_mask.s[3]] != 0;
}

// Forward and dq of one (64 query rows, b, h) block. DQ: the dq kernel, else the forward.
template <typename T, int DP, typename TT, bool DQ>
__device__ __forceinline__ void kl_qk_rows_tc(const KLParams& p, int64_t nmb) {
  using S = QKTcShape<DP>;
  using TE = TargetElem<TT>;
  constexpr bool IMPL = std::is_void<TT>::value;
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
  const bool logits = IMPL || p.target_is_logits;
  const float s_scale = static_cast<float>(p.student_scale), t_scale = static_cast<float>(p.target_scale);
  const RowSource<T> ksrc = row_source<T>(p.k, x.b, x.hk);
  const RowSource<T> ktsrc = IMPL ? row_source<T>(p.k_t, x.b, x.htk) : ksrc;
  const int64_t ntiles = (p.N + 63) / 64;
  const bool full_ok = ksrc.vec && p.D % 8 == 0 && (!IMPL || (ktsrc.vec && p.Dt % 8 == 0));
  const int64_t nfull = full_ok ? p.N / 64 : 0;
  const bool has_mask = p.key_mask.ptr != nullptr;
  // The FAST loops read the dense target with unit key stride (element loads: no alignment
  // needed, so an odd N such as 197 keeps them).
  const TE* tbase = IMPL ? nullptr : static_cast<const TE*>(p.target.ptr) + x.b * p.target.s[0] + x.h * p.target.s[1];
  const bool tunit = IMPL || p.target.s[3] == 1;
  // Tiles [0, nfast): no key mask, every key in range, the next tile staged in full (no edge code in
  // that loop); the forward's max needs positive scales there.
  int64_t nfast = 0;
  if (!has_mask && tunit && (DQ || (s_scale > 0.0f && (!logits || t_scale > 0.0f)))) {
    nfast = nfull - 1;
    if (nfast < 0) nfast = 0;
  }

  zero_padding<T, DP, LD>(Ks, 128, p.D);
  if constexpr (IMPL) zero_padding<T, DP, LD>(Kts, 128, p.Dt);
  stage_rows<T, 64, DP, LD>(Qs, row_source<T>(p.q, x.b, x.h), r0, p.M, p.D);
  if constexpr (IMPL) stage_rows<T, 64, DP, LD>(Qts, row_source<T>(p.q_t, x.b, x.ht), r0, p.M, p.Dt);
  cp_async_commit();
  auto stage = [&](int64_t tile, bool full) {
    stage_kv<T, DP, LD>(Ks, Kts, ksrc, ktsrc, tile, full, IMPL, p.N, p.D, p.Dt);
  };

  // The lane's rows g and g + 8 of the warp's 16: forward state, or (dq) the row values; the
  // 64-bit offsets of the target (rows past M read row M - 1: never stored, g = 0) and the mask.
  int64_t row[2], mrow[2] = {0, 0};
  const TE* trow[2] = {nullptr, nullptr};
  float m[2], l[2];
  KLSums<float> st[2];
  QKRow rv[2];
  init_rows(m, l, st, logits);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t i = r0 + warp * 16 + g + 8 * rr;
    row[rr] = i;
    if (has_mask) mrow[rr] = x.b * p.key_mask.s[0] + x.h * p.key_mask.s[1] + i * p.key_mask.s[2];
    if constexpr (!IMPL) trow[rr] = tbase + (i < p.M ? i : p.M - 1) * p.target.s[2];
    if constexpr (DQ) rv[rr] = qk_bwd_row(p, x.b, x.h, bh, i, logits);
  }
  float dq[DQ ? OT : 1][4];
  zero_acc(dq);
  const float as = s_scale * kL2e, au = t_scale * kL2e;

  // One tile; FAST / LOGITS compile-time (each combination its own loop in the SASS).
  auto step = [&](int64_t it, auto fast_tag, auto logits_tag) {
    constexpr bool FAST = decltype(fast_tag)::value, LOGITS = decltype(logits_tag)::value;
    pipeline_advance<FAST>([&](int64_t t) { stage(t, FAST || t < nfull); }, it, ntiles);
    const int buf = static_cast<int>(it & 1);
    const T* Kt = Ks + buf * 64 * LD;
    const int64_t j0 = it * 64;
    // Element (nt, e): row row[e / 2], key j0 + nt * 8 + 2 t4 + e % 2.
    float s[NT][4], u[NT][4];
    if constexpr (!IMPL) {  // the dense target first: its loads overlap the products
      if constexpr (FAST) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const TE* tp = trow[rr] + j0 + 2 * t4;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            u[nt][2 * rr] = to_float(tp[nt * 8]);
            u[nt][2 * rr + 1] = to_float(tp[nt * 8 + 1]);
          }
        }
      } else {
        for_each_acc<NT>(lane, [&](int nt, int e, int rr, int c) {
          const int64_t j = j0 + c;
          u[nt][e] = row[rr] < p.M && j < p.N ? to_float(trow[rr][j * p.target.s[3]]) : 0.0f;
        });
      }
    }
    zero_acc(s);
    mma_abt<T, DP, LD, NT>(s, Qs + warp * 16 * LD, Kt, lane);  // Q K^T
    if constexpr (IMPL) {
      zero_acc(u);
      mma_abt<T, DP, LD, NT>(u, Qts + warp * 16 * LD, Kts + buf * 64 * LD, lane);  // Q_t K_t^T
    }
    auto keep = [&](int, int, int rr, int c) {
      const int64_t j = j0 + c;
      return row[rr] < p.M && j < p.N && (!has_mask || mask_keeps(p, mrow[rr], j));
    };
    if constexpr (DQ) {
      for_each_acc<NT>(lane, [&](int nt, int e, int rr, int c) {
        const float ds = qk_dscore<LOGITS>(s[nt][e], u[nt][e], rv[rr], as, au);
        s[nt][e] = FAST || keep(nt, e, rr, c) ? ds : 0.0f;
      });
      mma_xb<T, DP, LD, NT>(dq, s, Kt, lane);  // dQ += dS K
    } else {
      qk_fwd_tile<LOGITS, !FAST>(m, l, st, s, u, s_scale, t_scale, lane, keep);
    }
    __syncthreads();  // every warp is done with this buffer before it is staged again
  };
  auto run = [&](auto logits_tag) {
    if (ntiles > 0) stage(0, nfull > 0);
    for (int64_t it = 0; it < nfast; ++it) step(it, std::true_type{}, logits_tag);
    for (int64_t it = nfast; it < ntiles; ++it) step(it, std::false_type{}, logits_tag);
  };
  if (logits) run(std::true_type{});
  else if constexpr (!IMPL) run(std::false_type{});
  cp_async_wait<0>();  // the Q group when there is no key tile

  if constexpr (DQ) {
    store_acc_rows(p.dq, dq, x.b, x.h, r0 + warp * 16, p.M, p.D, s_scale, lane);
  } else {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {  // the quad's partial sums; m and the logits' running max are the quad's
      l[rr] = quad_sum(l[rr]);
      st[rr].x = quad_sum(st[rr].x);
      st[rr].c = quad_sum(st[rr].c);
      if (!logits) st[rr].y = quad_sum(st[rr].y);
      if (t4 == 0 && row[rr] < p.M) store_row_stats(p, bh * p.M + row[rr], m[rr], l[rr], st[rr], logits);
    }
  }
}

// (128, 2) / (128, 1): up to 255 registers, no spills (ptxas's own choice may aim at more blocks).
template <typename T, int DP, typename TT>
__global__ void __launch_bounds__(kTcThreads, 2) kl_qk_fwd_tc_kernel(const KLParams p, int64_t nmb) {
  kl_qk_rows_tc<T, DP, TT, false>(p, nmb);
}

template <typename T, int DP, typename TT>
__global__ void __launch_bounds__(kTcThreads, 1) kl_qk_dq_tc_kernel(const KLParams p, int64_t nmb) {
  kl_qk_rows_tc<T, DP, TT, true>(p, nmb);
}

template <typename T, int DP, typename TT>
__global__ void __launch_bounds__(kTcThreads, 1) kl_qk_dk_tc_kernel(const KLParams p, int64_t nnb) {
  using S = QKTcShape<DP>;
  using TE = TargetElem<TT>;
  constexpr bool IMPL = std::is_void<TT>::value;
  constexpr int LD = S::LD, OT = S::OT, QH = S::QH, NH = QH / 8;
  LFI_DYNAMIC_SMEM(smem_f);
  QKRow* rowv = reinterpret_cast<QKRow*>(smem_f);  // [2][64]
  T* Ks = reinterpret_cast<T*>(rowv + 2 * 64);
  T* Qs = Ks + 64 * LD;    // two buffers
  T* Qts = Qs + 128 * LD;  // implicit teacher only: Q_t (two buffers), K_t (two buffers, by head parity)
  T* Kts = Qts + 128 * LD;

  const int64_t pid = blockIdx.x, nb = pid % nnb, bhk = pid / nnb;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv, G = p.H / p.Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g4 = lane >> 2, t4 = lane & 3;
  const int64_t n0 = nb * 64;
  const bool logits = IMPL || p.target_is_logits;
  const float s_scale = static_cast<float>(p.student_scale), t_scale = static_cast<float>(p.target_scale);
  const bool has_mask = p.key_mask.ptr != nullptr;

  zero_padding<T, DP, LD>(Qs, 128, p.D);
  if constexpr (IMPL) {
    zero_padding<T, DP, LD>(Qts, 128, p.Dt);
    zero_padding<T, DP, LD>(Kts, 128, p.Dt);
  }
  stage_rows<T, 64, DP, LD>(Ks, row_source<T>(p.k, b, hk), n0, p.N, p.D);
  cp_async_commit();

  const int64_t nq = (p.M + 63) / 64, nq_full = p.M / 64, ntot = G * nq;
  const bool vec = row_source<T>(p.q, b, hk * G).vec && p.D % 8 == 0 && p.q.s[1] % 8 == 0 &&
                   (!IMPL || (row_source<T>(p.q_t, b, 0).vec && p.Dt % 8 == 0 && p.q_t.s[1] % 8 == 0));
  // Tile `it` = (head hk * G + gg, query tile qt), it = gg * nq + qt: into buffer it & 1 (K_t of the
  // head, at its first tile, into buffer gg & 1: the previous head's K_t stays in use until its last
  // tile). The loops below pass gg and qt: no 64-bit division per tile.
  auto stage = [&](int64_t gg, int64_t qt, int buf) {
    const int64_t h = hk * G + gg, i0 = qt * 64, bh = b * p.H + h;
    const bool full = vec && qt < nq_full;
    stage_tile<T, 64, DP, LD>(Qs + buf * 64 * LD, row_source<T>(p.q, b, h), i0, p.M, p.D, full);
    if constexpr (IMPL) {
      stage_tile<T, 64, DP, LD>(Qts + buf * 64 * LD, row_source<T>(p.q_t, b, p.Ht == p.H ? h : 0), i0, p.M, p.Dt,
                                full);
      if (qt == 0) {
        const QKHeads x = heads_of(p, b, h);
        stage_rows<T, 64, DP, LD>(Kts + (gg & 1) * 64 * LD, row_source<T>(p.k_t, b, x.htk), n0, p.N, p.Dt);
      }
    }
    cp_async_commit();
    if (threadIdx.x < 64)  // plain stores: visible after the barrier that precedes their use
      rowv[buf * 64 + threadIdx.x] = qk_bwd_row(p, b, h, bh, i0 + threadIdx.x, logits);
  };

  float dk[OT][4];
  zero_acc(dk);
  int64_t jrow[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) jrow[rr] = n0 + warp * 16 + g4 + 8 * rr;
  // FAST query tiles: the whole key block and every query row in range, no key mask.
  const bool fast_block = !has_mask && n0 + 64 <= p.N;
  const float as = s_scale * kL2e, au = t_scale * kL2e;
  const int64_t ts2 = IMPL ? 0 : p.target.s[2];

  auto step = [&](int64_t gg, int64_t qt, auto fast_tag, auto logits_tag) {
    constexpr bool FAST = decltype(fast_tag)::value, LOGITS = decltype(logits_tag)::value;
    const int64_t it = gg * nq + qt, h = hk * G + gg, i0 = qt * 64;
    pipeline_advance([&](int64_t t) {
      const bool next_head = qt + 1 == nq;
      stage(next_head ? gg + 1 : gg, next_head ? 0 : qt + 1, static_cast<int>(t & 1));
    }, it, ntot);
    const int buf = static_cast<int>(it & 1);
    const T* Qt = Qs + buf * 64 * LD;
    const T* Qtt = Qts + buf * 64 * LD;
    const T* Ktt = Kts + (gg & 1) * 64 * LD + warp * 16 * LD;
    const QKRow* rv = rowv + buf * 64;
    // Dense target at (query i0 + 2 t4, key jrow[rr]) of head h (keys past N: never read).
    const TE* tq[2] = {nullptr, nullptr};
    if constexpr (!IMPL) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
        tq[rr] = static_cast<const TE*>(p.target.ptr) + b * p.target.s[0] + h * p.target.s[1] +
                 (i0 + 2 * t4) * ts2 + (jrow[rr] < p.N ? jrow[rr] : 0) * p.target.s[3];
    }
#pragma unroll
    for (int half = 0; half < 64 / QH; ++half) {
      // Element (nt, e): key jrow[e / 2], query i0 + c with c = half * QH + nt * 8 + 2 t4 + e % 2.
      float s[NH][4], u[NH][4];
      if constexpr (!IMPL) {
        for_each_acc<NH>(lane, [&](int nt, int e, int rr, int cc) {
          const bool in = FAST || (i0 + half * QH + cc < p.M && jrow[rr] < p.N);
          u[nt][e] = in ? to_float(tq[rr][(half * QH + nt * 8 + (e & 1)) * ts2]) : 0.0f;
        });
      }
      zero_acc(s);
      mma_abt<T, DP, LD, NH>(s, Ks + warp * 16 * LD, Qt + half * QH * LD, lane);  // S^T: keys x queries
      if constexpr (IMPL) {
        zero_acc(u);
        mma_abt<T, DP, LD, NH>(u, Ktt, Qtt + half * QH * LD, lane);  // U^T
      }
      for_each_acc<NH>(lane, [&](int nt, int e, int rr, int cc) {
        const int c = half * QH + cc;
        const float ds = qk_dscore<LOGITS>(s[nt][e], u[nt][e], rv[c], as, au);
        bool keep = true;
        if constexpr (!FAST) {
          const int64_t i = i0 + c, j = jrow[rr];
          keep = i < p.M && j < p.N &&
                 (!has_mask || mask_keeps(p, b * p.key_mask.s[0] + h * p.key_mask.s[1] + i * p.key_mask.s[2], j));
        }
        s[nt][e] = keep ? ds : 0.0f;
      });
      mma_xb<T, DP, LD, NH>(dk, s, Qt + half * QH * LD, lane);  // dK += dS^T Q
    }
    __syncthreads();  // the buffers are free for the stage two tiles ahead
  };
  // Per head: its full query tiles (FAST when the block is) and the rest; each loop its own SASS loop.
  auto run = [&](auto logits_tag) {
    if (ntot > 0) stage(0, 0, 0);
    const int64_t nqf = fast_block ? nq_full : 0;
    for (int64_t gg = 0; gg < G; ++gg) {
      for (int64_t qt = 0; qt < nqf; ++qt) step(gg, qt, std::true_type{}, logits_tag);
      for (int64_t qt = nqf; qt < nq; ++qt) step(gg, qt, std::false_type{}, logits_tag);
    }
  };
  if (logits) run(std::true_type{});
  else if constexpr (!IMPL) run(std::false_type{});
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

template <typename T, int DP, typename TT>
const char* kl_qk_forward_tc(const KLParams& p, cudaStream_t stream) {
  const int64_t nmb = (p.M + 63) / 64;
  return launch_qk_tc(kl_qk_fwd_tc_kernel<T, DP, TT>, p.B * p.H * nmb, qk_tc_smem<DP>(false, p.implicit, sizeof(T)),
                      stream, p, nmb);
}

template <typename T, int DP, typename TT>
const char* kl_qk_backward_tc(const KLParams& p, cudaStream_t stream) {
  const int64_t nmb = (p.M + 63) / 64, nnb = (p.N + 63) / 64;
  if (const char* e = launch_qk_tc(kl_qk_dq_tc_kernel<T, DP, TT>, p.B * p.H * nmb,
                                   qk_tc_smem<DP>(false, p.implicit, sizeof(T)), stream, p, nmb))
    return e;
  return launch_qk_tc(kl_qk_dk_tc_kernel<T, DP, TT>, p.B * p.Hkv * nnb, qk_tc_smem<DP>(true, p.implicit, sizeof(T)),
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

// The tensor-core kernels take an implicit teacher of q's dtype, or a dense target of q's dtype or
// float32 (one kernel per target type: no dtype switch per element); other targets (float64, the
// other b16 type) stay on the CUDA-core kernels.
bool kl_qk_tc_applies(const KLParams& p) {
  const int32_t dt = p.q.dtype;
  return (dt == kBF16 || dt == kF16) && p.k.dtype == dt && p.D <= 128 &&
         (p.key_mask.ptr == nullptr || p.key_mask.dtype == kBool) &&
         (p.implicit ? (p.q_t.dtype == dt && p.k_t.dtype == dt && p.Dt <= 128)
                     : (p.target.dtype == dt || p.target.dtype == kF32));
}

// Runs tc_launch(TypeTag<T>, DP, TypeTag<TT>) for the tensor-core kernels (kl_qk_tc_applies); TT:
// void for an implicit teacher, else the dense target's element type.
template <typename Launch>
static const char* with_qk_tc_config(const KLParams& p, Launch tc_launch) {
  return tc::with_b16_and_head_dim(p.q.dtype, p.implicit && p.Dt > p.D ? p.Dt : p.D, [&](auto t, auto dp) {
    if (p.implicit) return tc_launch(t, dp, tc::TypeTag<void>{});
    if (p.target.dtype == kF32) return tc_launch(t, dp, tc::TypeTag<float>{});
    return tc_launch(t, dp, t);
  });
}

const char* kl_qk_forward(const KLParams& p, void* stream_) {
  if (kl_qk_tc_applies(p)) {  // bf16 / fp16, head dims up to 128: tensor cores
    return with_qk_tc_config(p, [&](auto t, auto dp, auto tt) {
      return tc::kl_qk_forward_tc<typename decltype(t)::type, decltype(dp)::value, typename decltype(tt)::type>(
          p, static_cast<cudaStream_t>(stream_));
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
    return with_qk_tc_config(p, [&](auto t, auto dp, auto tt) {
      return tc::kl_qk_backward_tc<typename decltype(t)::type, decltype(dp)::value, typename decltype(tt)::type>(
          p, stream);
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
