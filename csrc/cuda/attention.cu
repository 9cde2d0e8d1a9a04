// CUDA kernels of interaction_attention (sm_80+), float32 accumulation on CUDA cores.
//
// The kernels' preambles (shared-memory carve-up, block indices) repeat in shape on purpose: each
// layout reads best next to the code using it (duplicates tool: attention.cu fwd ~ dq ~ dK / dV).
//
// Launch bounds (128, 2) on the forward and dK / dV kernels: up to 255 registers (ptxas otherwise
// aims at more resident blocks and spills 20-36 bytes).
//
// Forward / preprocess / dq: one block of 4 warps per (16 query rows, b, h); each warp owns 4
// rows, each lane one key of the current 32-key tile. Q rows and K/V tiles sit in shared memory
// as float (K padded to D + 1 so that lanes reading different keys hit different banks); scores
// are warp-parallel over keys, P V and dS K warp-parallel over head dims (32 * DL dims per lane),
// the probabilities broadcast with shuffles. Row statistics use the shared math of lfi_math.h.
// Scores are in natural units (s = scale q.k + mask); the row statistics (m, log l) are stored
// apart, (B, H, M, 2). Blocks whose rows return maps take two passes (statistics, then the exact
// P = exp((s - m) - log l)).
//
// dK / dV: one block per (16 keys, b, kv head), each warp owning 4 keys; the block loops over the
// group's query heads and 32-row tiles (lane = query row), so no atomics are needed.
#include "../lfi_kernels.h"
#include "cuda_common.cuh"

namespace lfi {
namespace cuda_k {
namespace {

__device__ __forceinline__ float ninf() { return neg_inf<float>(); }

// Masked scores of the warp's kRPW rows (Qw, pre-scaled by scale) against the key
// tile Ks (kBN x (D + 1)); the lane's key is j0 + lane.
__device__ __forceinline__ void warp_scores(float (&s)[kRPW], const float* Qw, const float* Ks, int D,
                                            const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t j0) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < kRPW; ++r) s[r] = 0.0f;
  add_row_dots(s, Qw, Ks + lane * (D + 1), D);
#pragma unroll
  for (int r = 0; r < kRPW; ++r) s[r] = masked_score(s[r], p, b, h, i0 + r, j0 + lane);
}

template <int DL>
__global__ void __launch_bounds__(kThreads, 2) attn_fwd_kernel(const AttnParams p, int64_t nmb) {
  LFI_DYNAMIC_SMEM(smem);
  const int D = p.D, Dv = p.Dv, ldv = kWarp * DL;
  float* Qs = smem;
  float* Ks = Qs + kBM * D;
  float* Vs = Ks + kBN * (D + 1);
  const int64_t pid = blockIdx.x, mb = pid % nmb, bh = pid / nmb;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r0 = mb * kBM, i0 = r0 + warp * kRPW;
  const bool has_kl = p.kl_target.ptr != nullptr, has_mask = p.mask.ptr != nullptr;
  const int64_t hi = p.causal ? (p.N < r0 + kBM ? p.N : r0 + kBM) : p.N;
  const bool maps = p.weights.ptr != nullptr && r0 < p.w_stop && r0 + kBM > p.w_start;

  load_rows(Qs, p.q, b, h, r0, kBM, D, D, p.M, float(p.scale));
  const float* Qw = Qs + warp * kRPW * D;
  float m[kRPW], l[kRPW], acc[kRPW][DL];
  KLSums<float> kls[kRPW];
  init_rows(m, l, kls, false);
#pragma unroll
  for (int r = 0; r < kRPW; ++r)
#pragma unroll
    for (int c = 0; c < DL; ++c) acc[r][c] = 0.0f;

  // Single online pass, or (maps) the statistics pass.
  for (int64_t j0 = 0; j0 < hi; j0 += kBN) {
    __syncthreads();
    load_rows(Ks, p.k, b, hk, j0, kBN, D, D + 1, p.N, 1.0f);
    if (!maps) load_rows(Vs, p.v, b, hk, j0, kBN, Dv, ldv, p.N, 1.0f);
    __syncthreads();
    float s[kRPW];
    warp_scores(s, Qw, Ks, D, p, b, h, i0, j0);
    const int64_t j = j0 + lane;
#pragma unroll
    for (int r = 0; r < kRPW; ++r) {
      const float sh_old = shift_of(m[r]);
      const float alpha = softmax_rescale(m[r], l[r], warp_max(s[r]));
      const float sh = shift_of(m[r]);
      const float pr = exp_(s[r] - sh);
      l[r] += warp_sum(pr);
      if (has_kl) {
        const int64_t i = i0 + r;
        const float t = (i < p.M && j < p.N) ? ldf(p.kl_target.ptr, off4(p.kl_target, b, h, i, j), p.kl_target.dtype)
                                             : 0.0f;
        kl_rescale(kls[r], sh_old, sh, 0.0f, false);
        KLSums<float> part = kl_zero<float>();
        kl_add(part, s[r], t, s[r] > ninf(), sh, 0.0f, 0.0f, false);
        kl_merge(kls[r], warp_sum(part), false);
      }
      if (!maps) {
#pragma unroll
        for (int c = 0; c < DL; ++c) acc[r][c] *= alpha;
        s[r] = pr;
      }
    }
    if (!maps) {
      add_outer(acc, s, Vs, ldv, kBN, ldv, lane);  // O += P V (V rows padded to ldv with zeros)
    }
  }

  float mf[kRPW], logl[kRPW];
#pragma unroll
  for (int r = 0; r < kRPW; ++r) {
    mf[r] = shift_of(m[r]);
    logl[r] = log_l_of(l[r], has_mask);  // l == 0 without a mask: infinite q / k, a NaN row (lfi_math.h)
  }

  if (maps) {  // exact probabilities: write the map rows, accumulate P V
    for (int64_t j0 = 0; j0 < hi; j0 += kBN) {
      __syncthreads();
      load_rows(Ks, p.k, b, hk, j0, kBN, D, D + 1, p.N, 1.0f);
      load_rows(Vs, p.v, b, hk, j0, kBN, Dv, ldv, p.N, 1.0f);
      __syncthreads();
      float s[kRPW];
      warp_scores(s, Qw, Ks, D, p, b, h, i0, j0);
      const int64_t j = j0 + lane;
#pragma unroll
      for (int r = 0; r < kRPW; ++r) {
        s[r] = prob_of(s[r], mf[r], logl[r]);
        const int64_t i = i0 + r;
        if (i >= p.w_start && i < p.w_stop && i < p.M && j < p.N)
          stf(p.weights.ptr, off4(p.weights, b, h, i - p.w_start, j), p.weights.dtype, s[r]);
      }
      add_outer(acc, s, Vs, ldv, kBN, ldv, lane);  // O += P V (V rows padded to ldv with zeros)
    }
    // Causal rows attend no key at or past `hi`: P of a -inf score there (0, NaN on a NaN row).
    for (int64_t j0 = (hi + kBN - 1) / kBN * kBN; j0 < p.N; j0 += kBN) {
      const int64_t j = j0 + lane;
#pragma unroll
      for (int r = 0; r < kRPW; ++r) {
        const int64_t i = i0 + r;
        if (i >= p.w_start && i < p.w_stop && i < p.M && j < p.N)
          stf(p.weights.ptr, off4(p.weights, b, h, i - p.w_start, j), p.weights.dtype,
              prob_of(ninf(), mf[r], logl[r]));
      }
    }
  }

  float* stats = static_cast<float*>(p.stats);
#pragma unroll
  for (int r = 0; r < kRPW; ++r) {
    const int64_t i = i0 + r;
    if (i >= p.M) continue;
    // The two-pass P is already normalised; the online accumulator still needs 1 / l. A row the mask
    // empties is 0 even where V holds NaN (0 * NaN); see out_of in lfi_math.h.
    // (Equal to out_of's acc / l, with one reciprocal per row: l == 0 without a mask gives NaN either way.)
    const bool empty = l[r] == 0.0f && has_mask;
    const float inv = maps ? 1.0f : 1.0f / l[r];
#pragma unroll
    for (int c = 0; c < DL; ++c) {
      const int e = lane + c * kWarp;
      if (e < Dv) stf(p.out.ptr, off4(p.out, b, h, i, e), p.out.dtype, empty ? 0.0f : acc[r][c] * inv);
    }
    if (lane == 0) {
      stats[2 * (bh * p.M + i)] = mf[r];
      stats[2 * (bh * p.M + i) + 1] = logl[r];
      if (has_kl) {
        float kl, tn;
        float t_shift;
        kl_finish(kls[r], logl[r], false, kl, t_shift, tn);
        static_cast<float*>(p.kl)[bh * p.M + i] = kl;
        static_cast<float*>(p.tnorm)[bh * p.M + i] = tn;
      }
    }
  }
}

// delta = rowsum(dO * O) + rowsum(P * G) (G = dL/dweights on the map rows).
__global__ void __launch_bounds__(kThreads) attn_bwd_pre_kernel(const AttnParams p, int64_t nmb) {
  LFI_DYNAMIC_SMEM(smem);
  const int D = p.D, Dv = p.Dv;
  float* Qs = smem;
  float* Ks = Qs + kBM * D;
  const int64_t pid = blockIdx.x, mb = pid % nmb, bh = pid / nmb;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r0 = mb * kBM, i0 = r0 + warp * kRPW;
  float delta[kRPW];
#pragma unroll
  for (int r = 0; r < kRPW; ++r) {
    const int64_t i = i0 + r;
    float acc = 0.0f;
    if (i < p.M)
      for (int e = lane; e < Dv; e += kWarp)
        acc += ldf(p.grad_out.ptr, off4(p.grad_out, b, h, i, e), p.grad_out.dtype) *
               ldf(p.out.ptr, off4(p.out, b, h, i, e), p.out.dtype);
    delta[r] = warp_sum(acc);
  }
  const bool dw = p.grad_weights.ptr != nullptr && r0 < p.w_stop && r0 + kBM > p.w_start;
  if (dw) {
    float mr[kRPW], logl[kRPW];
#pragma unroll
    for (int r = 0; r < kRPW; ++r) {
      row_stats(p.stats, bh, p.M, i0 + r, mr[r], logl[r]);
    }
    load_rows(Qs, p.q, b, h, r0, kBM, D, D, p.M, float(p.scale));
    const float* Qw = Qs + warp * kRPW * D;
    const int64_t hi = p.causal ? (p.N < r0 + kBM ? p.N : r0 + kBM) : p.N;
    for (int64_t j0 = 0; j0 < hi; j0 += kBN) {
      __syncthreads();
      load_rows(Ks, p.k, b, hk, j0, kBN, D, D + 1, p.N, 1.0f);
      __syncthreads();
      float s[kRPW];
      warp_scores(s, Qw, Ks, D, p, b, h, i0, j0);
      const int64_t j = j0 + lane;
#pragma unroll
      for (int r = 0; r < kRPW; ++r) {
        const int64_t i = i0 + r;
        float pg = 0.0f;
        if (i >= p.w_start && i < p.w_stop && i < p.M && j < p.N)
          pg = prob_of(s[r], mr[r], logl[r]) *
               ldf(p.grad_weights.ptr, off4(p.grad_weights, b, h, i - p.w_start, j), p.grad_weights.dtype);
        delta[r] += warp_sum(pg);
      }
    }
  }
  float* out = static_cast<float*>(p.delta);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRPW; ++r)
      if (i0 + r < p.M) out[bh * p.M + i0 + r] = delta[r];
  }
}

template <int DL>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const AttnParams p, int64_t nmb) {
  LFI_DYNAMIC_SMEM(smem);
  const int D = p.D, Dv = p.Dv;
  float* Qs = smem;
  float* dOs = Qs + kBM * D;
  float* Ks = dOs + kBM * Dv;
  float* Vs = Ks + kBN * (D + 1);
  const int64_t pid = blockIdx.x, mb = pid % nmb, bh = pid / nmb;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r0 = mb * kBM, i0 = r0 + warp * kRPW;
  const int64_t hi = p.causal ? (p.N < r0 + kBM ? p.N : r0 + kBM) : p.N;
  load_rows(Qs, p.q, b, h, r0, kBM, D, D, p.M, float(p.scale));
  load_rows(dOs, p.grad_out, b, h, r0, kBM, Dv, Dv, p.M, 1.0f);
  const float* Qw = Qs + warp * kRPW * D;
  const float* dOw = dOs + warp * kRPW * Dv;
  const float* dl = static_cast<const float*>(p.delta);
  float mr[kRPW], logl[kRPW], delta[kRPW], dq[kRPW][DL];
  KLGradRow<float> klr[kRPW];
#pragma unroll
  for (int r = 0; r < kRPW; ++r) {
    const int64_t i = i0 + r;
    row_stats(p.stats, bh, p.M, i, mr[r], logl[r]);
    delta[r] = i < p.M ? dl[bh * p.M + i] : 0.0f;
    klr[r] = attn_kl_row(p, b, h, bh, i);
#pragma unroll
    for (int c = 0; c < DL; ++c) dq[r][c] = 0.0f;
  }
  float* ds_out = static_cast<float*>(p.ds);
  for (int64_t j0 = 0; j0 < hi; j0 += kBN) {
    __syncthreads();
    load_rows(Ks, p.k, b, hk, j0, kBN, D, D + 1, p.N, 1.0f);
    load_rows(Vs, p.v, b, hk, j0, kBN, Dv, Dv + 1, p.N, 1.0f);
    __syncthreads();
    float s[kRPW], dp[kRPW];
    warp_scores(s, Qw, Ks, D, p, b, h, i0, j0);
#pragma unroll
    for (int r = 0; r < kRPW; ++r) dp[r] = 0.0f;
    add_row_dots(dp, dOw, Vs + lane * (Dv + 1), Dv);
    const int64_t j = j0 + lane;
#pragma unroll
    for (int r = 0; r < kRPW; ++r) {
      const int64_t i = i0 + r;
      const float pr = prob_of(s[r], mr[r], logl[r]);
      const float ds = dscore(p, b, h, i, j, s[r], pr, dp[r], delta[r], klr[r]);
      if (ds_out != nullptr && i < p.M && j < p.N) ds_out[(bh * p.M + i) * p.N + j] = ds;
      s[r] = ds;
    }
    add_outer(dq, s, Ks, D + 1, kBN, D, lane);  // dQ += dS K
  }
  store_warp_rows(p.dq, dq, b, h, i0, p.M, D, float(p.scale), lane);
}

template <int DL>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_dkdv_kernel(const AttnParams p, int64_t nnb) {
  LFI_DYNAMIC_SMEM(smem);
  const int D = p.D, Dv = p.Dv;
  float* Ks = smem;
  float* Vs = Ks + kBNK * D;
  float* Qs = Vs + kBNK * Dv;
  float* dOs = Qs + kBMR * (D + 1);
  float* rowm = dOs + kBMR * (Dv + 1);
  float* rowll = rowm + kBMR;
  float* deltas = rowll + kBMR;
  float* klrows = deltas + kBMR;  // 4 x kBMR: KLGradRow fields (put_kl_row)
  const int64_t pid = blockIdx.x, nb = pid % nnb, bhk = pid / nnb;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv, G = p.H / p.Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n0 = nb * kBNK;
  const float scale = float(p.scale);
  load_rows(Ks, p.k, b, hk, n0, kBNK, D, D, p.N, 1.0f);
  load_rows(Vs, p.v, b, hk, n0, kBNK, Dv, Dv, p.N, 1.0f);
  float dk[kKPW][DL], dv[kKPW][DL];
#pragma unroll
  for (int kk = 0; kk < kKPW; ++kk)
#pragma unroll
    for (int c = 0; c < DL; ++c) dk[kk][c] = dv[kk][c] = 0.0f;
  const float* stats = static_cast<const float*>(p.stats);
  const float* dlt = static_cast<const float*>(p.delta);
  // Causal: query rows above the block's first key see none of its keys.
  const int64_t row_lo = p.causal ? n0 : 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g, bh = b * p.H + h;
    for (int64_t i0 = row_lo; i0 < p.M; i0 += kBMR) {
      __syncthreads();
      load_rows(Qs, p.q, b, h, i0, kBMR, D, D + 1, p.M, 1.0f);
      load_rows(dOs, p.grad_out, b, h, i0, kBMR, Dv, Dv + 1, p.M, 1.0f);
      load_stats(rowm, stats, bh * p.M, i0, kBMR, p.M, 2, 0, 0.0f);
      load_stats(rowll, stats, bh * p.M, i0, kBMR, p.M, 2, 1, pos_inf<float>());
      load_stats(deltas, dlt, bh * p.M, i0, kBMR, p.M, 1, 0, 0.0f);
      for (int r = threadIdx.x; r < kBMR; r += blockDim.x) put_kl_row(klrows, kBMR, r, attn_kl_row(p, b, h, bh, i0 + r));
      __syncthreads();
      float s[kKPW], dp[kKPW];
      lane_dots(s, Qs, Ks, D, lane, warp);
      lane_dots(dp, dOs, Vs, Dv, lane, warp);
      const int64_t i = i0 + lane;
      const KLGradRow<float> klr = get_kl_row(klrows, kBMR, lane);
      float pr[kKPW], ds[kKPW];
#pragma unroll
      for (int kk = 0; kk < kKPW; ++kk) {
        const int64_t j = n0 + warp * kKPW + kk;
        const float sc = masked_score(s[kk] * scale, p, b, h, i, j);
        pr[kk] = prob_of(sc, rowm[lane], rowll[lane]);
        ds[kk] = dscore(p, b, h, i, j, sc, pr[kk], dp[kk], deltas[lane], klr);
      }
      add_outer(dv, pr, dOs, Dv + 1, kBMR, Dv, lane);  // dV += P^T dO
      add_outer(dk, ds, Qs, D + 1, kBMR, D, lane);     // dK += dS^T Q
    }
  }
  store_warp_rows(p.dk, dk, b, hk, n0 + warp * kKPW, p.N, D, scale, lane);
  store_warp_rows(p.dv, dv, b, hk, n0 + warp * kKPW, p.N, Dv, 1.0f, lane);
}

}  // namespace
}  // namespace cuda_k

namespace cuda {

using namespace cuda_k;

const char* attention_forward(const AttnParams& p, void* stream_) {
  // bf16 / fp16 with head dims up to 128: tensor cores (attention_tc.cu).
  if (attention_forward_tc_applies(p)) return attention_forward_tc(p, stream_);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const int64_t nmb = (p.M + kBM - 1) / kBM;
  const int64_t grid = p.B * p.H * nmb;
  if (grid == 0) return nullptr;
  const int dl = lanes_for(p.Dv);
  LFI_DISPATCH_DL(dl, DLC, {
    const size_t smem = sizeof(float) * (kBM * p.D + kBN * (p.D + 1) + kBN * kWarp * DLC);
    LFI_CUDA_TRY(prepare(attn_fwd_kernel<DLC>, smem));
    LFI_LAUNCH(attn_fwd_kernel<DLC>, grid, kThreads, smem, stream, p, nmb);
  })
  return check_launch();
}

const char* attention_backward(const AttnParams& p, void* stream_) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const int64_t nmb = (p.M + kBM - 1) / kBM;
  const int64_t grid_m = p.B * p.H * nmb;
  if (grid_m == 0) return nullptr;
  // bf16 / fp16 with head dims up to 128: the map rows' rowsum(P * G) of delta (a matrix product
  // recomputes P), dK / dV and dQ on tensor cores (attention_tc.cu); rowsum(dO * O) has no matrix
  // product and stays in attn_bwd_pre_kernel.
  const bool tc = attention_forward_tc_applies(p);
  {
    AttnParams pre = p;
    if (tc) pre.grad_weights.ptr = nullptr;
    const size_t smem = sizeof(float) * (kBM * p.D + kBN * (p.D + 1));
    LFI_CUDA_TRY(prepare(attn_bwd_pre_kernel, smem));
    LFI_LAUNCH(attn_bwd_pre_kernel, grid_m, kThreads, smem, stream, pre, nmb);
    if (const char* e = check_launch()) return e;
  }
  if (tc) return attention_backward_tc(p, stream_);
  {
    const int64_t nnb = (p.N + kBNK - 1) / kBNK;
    const int64_t grid_n = p.B * p.Hkv * nnb;
    const int dl = lanes_for(p.D > p.Dv ? p.D : p.Dv);
    LFI_DISPATCH_DL(dl, DLC, {
      const size_t smem =
          sizeof(float) * (kBNK * p.D + kBNK * p.Dv + kBMR * (p.D + 1) + kBMR * (p.Dv + 1) + 7 * kBMR);
      LFI_CUDA_TRY(prepare(attn_bwd_dkdv_kernel<DLC>, smem));
      LFI_LAUNCH(attn_bwd_dkdv_kernel<DLC>, grid_n, kThreads, smem, stream, p, nnb);
    })
    if (const char* e = check_launch()) return e;
  }
  {
    const int dl = lanes_for(p.D);
    LFI_DISPATCH_DL(dl, DLC, {
      const size_t smem = sizeof(float) * (kBM * p.D + kBM * p.Dv + kBN * (p.D + 1) + kBN * (p.Dv + 1));
      LFI_CUDA_TRY(prepare(attn_bwd_dq_kernel<DLC>, smem));
      LFI_LAUNCH(attn_bwd_dq_kernel<DLC>, grid_m, kThreads, smem, stream, p, nmb);
    })
  }
  return check_launch();
}

#define LFI_STR2(...) #__VA_ARGS__
#define LFI_STR(...) LFI_STR2(__VA_ARGS__)

const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return LFI_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace cuda
}  // namespace lfi
