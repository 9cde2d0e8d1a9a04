// Tensor-core forward of interaction_attention for bfloat16 / float16 (sm_80+): mma.sync
// m16n8k16 with fp32 accumulation (tc_common.cuh), used by attention.cu's attention_forward for
// bf16 / fp16 inputs with head dims up to 128 (fp32, and head dims past 128, stay on the CUDA-core
// kernels there).
//
// One block of 4 warps per (64 query rows, b, h); each warp owns 16 rows. Q (64 rows) and K / V
// tiles of 64 keys are staged in shared memory with cp.async, K / V double-buffered (the copy of
// tile t + 1 overlaps the math of tile t), rows padded by 8 elements so that ldmatrix's eight row
// addresses hit distinct banks. Per tile and warp: S = Q K^T as 8 accumulator tiles (16 x 8) in
// registers, the online softmax on those registers (the quad of lanes sharing a row reduces the max
// with two shuffles; l stays per lane until the end), P packed to b16 in place as the A operand of
// P V (two adjacent accumulator tiles are one A fragment), O in 16 x 8 accumulator tiles.
//
// dtype and padded head dim (DP = 32 / 64 / 96 / 128, covering D and Dv) are template parameters;
// 64-bit offsets are formed once per (b, head) and once per staged 16-byte row chunk. Tiles that
// need no per-element work (no mask, no fused KL, all keys in range, below the causal diagonal)
// take a branch without any masking; the others apply bounds, causality, masks and the KL sums per
// element with the shared math of lfi_math.h. Blocks returning map rows take two passes
// (statistics, then the exact P = exp((s - m) - log l), as the CUDA-core kernel).
#include <type_traits>

#include "../lfi_kernels.h"
#include "tc_tiles.cuh"

namespace lfi {
namespace tc {
namespace {

using namespace ::lfi::cuda_k;

constexpr int kTcBM = 64;  // query rows per block (16 per warp)
constexpr int kTcBN = 64;  // keys per tile

template <typename T, int DP>
struct FwdShape {
  static constexpr int LD = DP + 8;       // shared row stride (elements): 16-byte aligned rows, no bank conflicts
  static constexpr int KS = DP / 16;      // k steps of Q K^T
  static constexpr int NT = kTcBN / 8;    // accumulator tiles of S per warp
  static constexpr int OT = DP / 8;       // accumulator tiles of O per warp
  static constexpr size_t smem = sizeof(T) * LD * (kTcBM + 4 * kTcBN);  // Q, K x 2, V x 2
};


// Launch bounds (128 threads, 2 blocks per SM): ptxas may then use up to 255 registers; left to
// itself it squeezed DP = 32 into 168 registers (3 blocks) at the price of a 56-byte spill.
template <typename T, int DP>
__global__ void __launch_bounds__(kTcThreads, 2) attn_fwd_tc_kernel(const AttnParams p, int64_t nmb) {
  using S = FwdShape<T, DP>;
  constexpr int LD = S::LD, KS = S::KS, NT = S::NT, OT = S::OT;
  LFI_DYNAMIC_SMEM(smem_f);
  T* Qs = reinterpret_cast<T*>(smem_f);
  T* Ks = Qs + kTcBM * LD;  // two buffers of kTcBN x LD
  T* Vs = Ks + 2 * kTcBN * LD;

  const int64_t pid = blockIdx.x, mb = pid % nmb, bh = pid / nmb;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t r0 = mb * kTcBM;
  const int64_t hi = p.causal ? (p.N < r0 + kTcBM ? p.N : r0 + kTcBM) : p.N;  // keys any row of the block sees
  const int ntiles = static_cast<int>((hi + kTcBN - 1) / kTcBN);
  const bool has_mask = p.mask.ptr != nullptr, has_kl = p.kl_target.ptr != nullptr;
  const bool maps = p.weights.ptr != nullptr && r0 < p.w_stop && r0 + kTcBM > p.w_start;
  const float scale = static_cast<float>(p.scale);
  const float l2e = static_cast<float>(kLog2e);

  const RowSource<T> qsrc = row_source<T>(p.q, b, h), ksrc = row_source<T>(p.k, b, hk),
                     vsrc = row_source<T>(p.v, b, hk);
  // The lane's two rows: g and g + 8 of the warp's 16; their 64-bit offsets, once.
  int64_t row[2], mrow[2] = {0, 0}, trow[2] = {0, 0};
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    row[rr] = r0 + warp * 16 + g + 8 * rr;
    if (has_mask) mrow[rr] = b * p.mask.s[0] + h * p.mask.s[1] + row[rr] * p.mask.s[2];
    if (has_kl) trow[rr] = b * p.kl_target.s[0] + h * p.kl_target.s[1] + row[rr] * p.kl_target.s[2];
  }

  float m[2], l[2], o[OT][4];
  KLSums<float> kls[2];
  init_rows(m, l, kls, false);
  zero_acc(o);
  float mf[2] = {0.0f, 0.0f}, logl[2] = {0.0f, 0.0f};  // final statistics (maps pass)

  zero_padding<T, DP, LD>(Ks, 2 * kTcBN, p.D);
  zero_padding<T, DP, LD>(Vs, 2 * kTcBN, p.Dv);
  stage_rows<T, kTcBM, DP, LD>(Qs, qsrc, r0, p.M, p.D);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  // The warp's Q rows as A fragments, held for the whole kernel up to DP = 96; at DP = 128 they are
  // re-read from shared memory per tile (32 registers fewer: no spills on sm_80).
  constexpr bool kQRegs = DP <= 96;
  constexpr int KQ = kQRegs ? KS : 1;
  uint32_t qf[KQ][4];
  const T* Qw = Qs + (warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
  if constexpr (kQRegs) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldsm_x4(qf[ks], Qw + ks * 16);
  }
  const bool full_ok = ksrc.vec && vsrc.vec && p.D % 8 == 0 && p.Dv % 8 == 0;
  // Key tiles [0, nfull) are staged with stage_rows_full.
  const int64_t nfull = full_ok ? (p.N / kTcBN < ntiles ? p.N / kTcBN : ntiles) : 0;

  // mode 0: the single online pass; 1: statistics pass (maps); 2: exact-P pass (maps).
  auto run_pass = [&](int mode) {
    const bool with_v = mode != 1;
    auto stage = [&](int64_t tile, bool full, bool v) {
      stage_kv<T, DP, LD>(Ks, Vs, ksrc, vsrc, tile, full, v, p.N, p.D, p.Dv);
    };
    // Tiles [0, nfast) need no per-element work in the online pass: no mask or KL, every key
    // in range and at or below every row's diagonal (a causal block's row r0 sees keys <= r0).
    int64_t nfast = 0;
    if (mode == 0 && !has_mask && !has_kl && scale > 0.0f) {
      nfast = p.N / kTcBN;
      if (p.causal && (r0 + 1) / kTcBN < nfast) nfast = (r0 + 1) / kTcBN;
      // ... and whose successor is a staged-in-full tile too, so that the fast loop holds no
      // edge-tile staging code.
      if (nfast > nfull - 1) nfast = nfull - 1;
      if (nfast < 0) nfast = 0;
    }
    if (ntiles > 0) stage(0, nfull > 0, with_v);
    // One tile; FAST: compiled without any masking (its own loop in the SASS).
    auto step = [&](int it, auto fast_tag) {
      constexpr bool FAST = decltype(fast_tag)::value;
      // FAST tiles' successors are staged in full (nfast < nfull): no edge-tile code in that loop.
      // (FAST runs in the single online pass only: with V.)
      pipeline_advance<FAST>([&](int64_t t) { stage(t, FAST || t < nfull, FAST || with_v); }, it, ntiles);
      const T* Kt = Ks + (it & 1) * kTcBN * LD;
      const T* Vt = Vs + (it & 1) * kTcBN * LD;
      const int64_t j0 = static_cast<int64_t>(it) * kTcBN;

      // S = Q K^T (unscaled) in NT accumulator tiles.
      float s[NT][4];
      zero_acc(s);
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const int kq = kQRegs ? ks : 0;
        if constexpr (!kQRegs) ldsm_x4(qf[0], Qw + ks * 16);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t kb[4];
          ldsm_x4(kb, Kt + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
          const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
          mma16816<T>(s[2 * np], qf[kq], b0);
          mma16816<T>(s[2 * np + 1], qf[kq], b1);
        }
      }

      if constexpr (FAST) {
        // Raw scores: the max of scale * s is scale * max s (scale > 0), and exp(scale s - sh) is
        // exp2(s * scale log2 e - sh log2 e): one FMA and one MUFU.EX2 per score.
        float tmax[2], alpha[2], shl2[2];
        acc_row_max(tmax, s);
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          alpha[rr] = softmax_rescale(m[rr], l[rr], tmax[rr] * scale);
          shl2[rr] = shift_of(m[rr]) * l2e;
        }
        const float scale_l2 = scale * l2e;
        for_each_acc<NT>(lane, [&](int nt, int e, int rr, int) {
          const float pr = ex2(softmax_exp2_arg_scaled(s[nt][e], scale_l2, shl2[rr]));
          l[rr] += pr;
          s[nt][e] = pr;
        });
        scale_acc_rows(o, alpha);
      } else {
      // Scores in natural units; element (nt, e) is row g + 8 (e / 2), key j0 + nt * 8 + 2 t4 + e % 2.
      const bool per_element =
          has_mask || has_kl || mode == 2 || j0 + kTcBN > p.N || (p.causal && j0 + kTcBN - 1 > r0);
      if (per_element) {
        for_each_acc<NT>(lane, [&](int nt, int e, int rr, int c) {
          const int64_t i = row[rr], j = j0 + c;
          float sv = s[nt][e] * scale;
          bool valid = i < p.M && j < p.N && (!p.causal || j <= i);
          if (valid && has_mask) {
            const float mv = ldf(p.mask.ptr, mrow[rr] + j * p.mask.s[3], p.mask.dtype);
            if (p.mask_bool) valid = mv != 0.0f;
            else sv += mv;
          }
          s[nt][e] = valid ? sv : neg_inf<float>();
        });
      } else {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] *= scale;
      }

      if (mode == 2) {  // exact probabilities from the final statistics; map rows written
        for_each_acc<NT>(lane, [&](int nt, int e, int rr, int c) {
          const int64_t i = row[rr], j = j0 + c;
          const float pr = prob_of(s[nt][e], mf[rr], logl[rr]);
          s[nt][e] = pr;
          if (i >= p.w_start && i < p.w_stop && i < p.M && j < p.N)
            stf(p.weights.ptr, off4(p.weights, b, h, i - p.w_start, j), p.weights.dtype, pr);
        });
      } else {
        // Online softmax: the quad of lanes sharing a row reduces the tile max.
        float tmax[2], alpha[2], shl2[2];
        acc_row_max(tmax, s);
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const float sh_old = shift_of(m[rr]);
          alpha[rr] = softmax_rescale(m[rr], l[rr], tmax[rr]);
          const float sh = shift_of(m[rr]);
          shl2[rr] = sh * l2e;
          if (has_kl) kl_rescale(kls[rr], sh_old, sh, 0.0f, false);
        }
        if (has_kl) {
          for_each_acc<NT>(lane, [&](int nt, int e, int rr, int c) {
            const int64_t i = row[rr], j = j0 + c;
            const float tv =
                (i < p.M && j < p.N) ? ldf(p.kl_target.ptr, trow[rr] + j * p.kl_target.s[3], p.kl_target.dtype) : 0.0f;
            kl_add(kls[rr], s[nt][e], tv, s[nt][e] > neg_inf<float>(), shift_of(m[rr]), 0.0f, 0.0f, false);
          });
        }
        for_each_acc<NT>(lane, [&](int nt, int e, int rr, int) {
          const float pr = ex2(softmax_exp2_arg(s[nt][e], shl2[rr]));
          l[rr] += pr;
          s[nt][e] = pr;
        });
        if (mode == 0) scale_acc_rows(o, alpha);
      }

      }  // FAST / general

      if (with_v) mma_xb<T, DP, LD, NT>(o, s, Vt, lane);  // O += P V, P as b16 A fragments from the S registers
      __syncthreads();  // every warp is done with this buffer before the next stage overwrites it
    };
    for (int it = 0; it < nfast; ++it) step(it, std::true_type{});
    for (int it = static_cast<int>(nfast); it < ntiles; ++it) step(it, std::false_type{});
  };

  run_pass(maps ? 1 : 0);
  // Row sums over the quad; final statistics.
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    l[rr] = quad_sum(l[rr]);
    if (has_kl) kls[rr] = lanes_sum<4>(kls[rr]);
    mf[rr] = shift_of(m[rr]);
    logl[rr] = log_l_of(l[rr], has_mask);  // l == 0 without a mask: infinite q / k, a NaN row (lfi_math.h)
  }
  if (maps) {
    run_pass(2);
    // Causal rows attend no key past the last tile: P of a -inf score there (0; NaN on a NaN row). Row
    // g + 8 rr of the warp's 16 sits with lanes 4 g .. 4 g + 3; lanes here run over keys.
    const float fill[2] = {prob_of(neg_inf<float>(), mf[0], logl[0]), prob_of(neg_inf<float>(), mf[1], logl[1])};
    for (int64_t j0 = static_cast<int64_t>(ntiles) * kTcBN; j0 < p.N; j0 += kWarp) {
      const int64_t j = j0 + lane;
      for (int r = 0; r < 16; ++r) {
        const float v = __shfl_sync(kFull, fill[r >> 3], (r & 7) * 4);
        const int64_t i = r0 + warp * 16 + r;
        if (i >= p.w_start && i < p.w_stop && i < p.M && j < p.N)
          stf(p.weights.ptr, off4(p.weights, b, h, i - p.w_start, j), p.weights.dtype, v);
      }
    }
  }

  float* stats = static_cast<float*>(p.stats);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t i = row[rr];
    if (i >= p.M) continue;
    // The two-pass P is already normalised; the online accumulator still needs 1 / l. A row the mask
    // empties is 0 even where V holds NaN (0 * NaN); see out_of in lfi_math.h.
    // (Equal to out_of's acc / l, with one reciprocal per row: l == 0 without a mask gives NaN either way.)
    const bool empty = l[rr] == 0.0f && has_mask;
    const float inv = maps ? 1.0f : 1.0f / l[rr];
    const int64_t obase = b * p.out.s[0] + h * p.out.s[1] + i * p.out.s[2];
#pragma unroll
    for (int ot = 0; ot < OT; ++ot)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int e = ot * 8 + 2 * t4 + c;
        if (e < p.Dv) stf(p.out.ptr, obase + e * p.out.s[3], p.out.dtype, empty ? 0.0f : o[ot][2 * rr + c] * inv);
      }
    if (t4 == 0) {
      stats[2 * (bh * p.M + i)] = mf[rr];
      stats[2 * (bh * p.M + i) + 1] = logl[rr];
      if (has_kl) {
        float kl, tn, t_shift;
        kl_finish(kls[rr], logl[rr], false, kl, t_shift, tn);
        static_cast<float*>(p.kl)[bh * p.M + i] = kl;
        static_cast<float*>(p.tnorm)[bh * p.M + i] = tn;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward on tensor cores (after attn_bwd_pre_kernel of attention.cu has written delta).
//
// dK / dV: one block per (64 keys, b, kv head), each warp owning 16 keys; the block loops over the
// group's query heads and 64-row query tiles (Q, dO and the rows' statistics double-buffered with
// cp.async), so no atomics are needed. Per tile and warp, keys as rows: S^T = K Q^T and
// dP^T = V dO^T in accumulator tiles, P^T and dS^T element-wise, then dV += P^T dO and
// dK += dS^T Q with P^T / dS^T packed in place as A fragments.
// dQ: one block per (64 query rows, b, h), as the forward: S = Q K^T, dP = dO V^T, dS, and
// dQ += dS K; it also writes dS for the mask gradient.
// Element-wise math (shared, lfi_math.h): P = exp((s - m) - log l) (prob_of), dS = P (dP - delta)
// (attn_dscore) + the fused KL's g (P - t) (kl_dscore); interior tiles without masks / maps
// gradient / KL run a separately compiled fast body: P = exp2(x * scale log2 e - (m + log l) log2 e).
// ---------------------------------------------------------------------------------------------

// Per query row of a staged tile: m, log l, (m + log l) log2 e, delta, and the KL factors g, 1 / Z.
constexpr int kRowVals = 6;

template <typename T, int DP>
struct BwdShape {
  static constexpr int LD = DP + 8;
  // dK / dV keep 2 x DP / 8 x 4 accumulators per lane; at DP = 96 the 64-query tile is taken in
  // halves of 32 queries so that S^T and dP^T fit beside them without spilling (DP = 128 computes
  // dK and dV in two launches, see attn_bwd_dkdv_tc_kernel).
  static constexpr int QH = (DP <= 64 || DP > 96) ? 64 : 32;
  static constexpr int NT = 64 / 8;
  static constexpr int OT = DP / 8;
  // Two fixed tiles, two double-buffered tiles, then the row values (two buffers).
  static constexpr size_t smem = sizeof(T) * LD * 64 * 6 + sizeof(float) * 2 * kRowVals * 64;
};

// DO_DK / DO_DV: which of dK, dV this launch computes (both up to DP = 96; at DP = 128 the 2 x 64
// accumulators per lane of both would spill, so dV and dK are two launches, the dV one without dP).
template <typename T, int DP, bool DO_DK, bool DO_DV>
__global__ void __launch_bounds__(kTcThreads, 1) attn_bwd_dkdv_tc_kernel(const AttnParams p, int64_t nnb) {
  using S = BwdShape<T, DP>;
  constexpr int LD = S::LD, OT = S::OT;
  LFI_DYNAMIC_SMEM(smem_f);
  T* Ks = reinterpret_cast<T*>(smem_f);
  T* Vs = Ks + 64 * LD;
  T* Qs = Vs + 64 * LD;     // two buffers
  T* dOs = Qs + 128 * LD;   // two buffers
  float* rowv = reinterpret_cast<float*>(dOs + 128 * LD);  // [2][kRowVals][64]

  const int64_t pid = blockIdx.x, nb = pid % nnb, bhk = pid / nnb;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv, G = p.H / p.Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g4 = lane >> 2, t4 = lane & 3;
  const int64_t n0 = nb * 64;
  const float scale = static_cast<float>(p.scale), l2e = static_cast<float>(kLog2e);
  const bool general_all = p.mask.ptr != nullptr || p.grad_kl.ptr != nullptr || p.grad_weights.ptr != nullptr ||
                           !(scale > 0.0f);

  zero_padding<T, DP, LD>(Qs, 128, p.D);
  zero_padding<T, DP, LD>(dOs, 128, p.Dv);
  stage_rows<T, 64, DP, LD>(Ks, row_source<T>(p.k, b, hk), n0, p.N, p.D);
  stage_rows<T, 64, DP, LD>(Vs, row_source<T>(p.v, b, hk), n0, p.N, p.Dv);
  cp_async_commit();

  float dk[OT][4], dv[OT][4];
  zero_acc(dk);
  zero_acc(dv);
  int64_t jrow[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) jrow[rr] = n0 + warp * 16 + g4 + 8 * rr;

  const float* dlt = static_cast<const float*>(p.delta);
  const int64_t row_lo = p.causal ? n0 : 0;  // causal: rows above the block's first key see none of it
  const int64_t nq = p.M > row_lo ? (p.M - row_lo + 63) / 64 : 0;
  const int64_t nq_full = p.M > row_lo ? (p.M - row_lo) / 64 : 0;
  const int64_t ntot = G * nq;
  const bool vec = row_source<T>(p.q, b, hk * G).vec && row_source<T>(p.grad_out, b, hk * G).vec &&
                   p.D % 8 == 0 && p.Dv % 8 == 0 && p.q.s[1] % 8 == 0 && p.grad_out.s[1] % 8 == 0;

  // Tile it = gg * nq + qt (head hk * G + gg, rows row_lo + qt * 64) into buffer it & 1; FULL: known
  // to be a whole in-range tile of a 16-byte aligned source (the fast loop's successors). The loops
  // pass gg and qt: no 64-bit division per tile.
  auto stage = [&](int64_t gg, int64_t qt, int buf, bool full) {
    const int64_t h = hk * G + gg, i0 = row_lo + qt * 64, bh = b * p.H + h;
    const RowSource<T> qsrc = row_source<T>(p.q, b, h), dsrc = row_source<T>(p.grad_out, b, h);
    full = full || (vec && qt < nq_full);
    stage_tile<T, 64, DP, LD>(Qs + buf * 64 * LD, qsrc, i0, p.M, p.D, full);
    stage_tile<T, 64, DP, LD>(dOs + buf * 64 * LD, dsrc, i0, p.M, p.Dv, full);
    cp_async_commit();
    if (threadIdx.x < 64) {  // plain loads: visible after the barrier that precedes their use
      const int r = threadIdx.x;
      const int64_t i = i0 + r;
      float* rv = rowv + buf * kRowVals * 64;
      const bool in = i < p.M;
      float m, ll;
      row_stats(p.stats, bh, p.M, i, m, ll);
      const KLGradRow<float> klr = attn_kl_row(p, b, h, bh, i);
      rv[0 * 64 + r] = m;
      rv[1 * 64 + r] = ll;
      rv[2 * 64 + r] = (m + ll) * l2e;
      rv[3 * 64 + r] = in ? dlt[bh * p.M + i] : 0.0f;
      rv[4 * 64 + r] = klr.g;
      rv[5 * 64 + r] = klr.inv_z;
    }
  };

  if (ntot > 0) stage(0, 0, 0, false);
  auto step = [&](int64_t gg, int64_t qt, auto fast_tag) {
    constexpr bool FAST = decltype(fast_tag)::value;
    const int64_t it = gg * nq + qt;
    pipeline_advance([&](int64_t t) {
      const bool next_head = qt + 1 == nq;
      stage(next_head ? gg + 1 : gg, next_head ? 0 : qt + 1, static_cast<int>(t & 1), FAST);
    }, it, ntot);
    const int buf = static_cast<int>(it & 1);
    const T* Qt = Qs + buf * 64 * LD;
    const T* dOt = dOs + buf * 64 * LD;
    const float* rv = rowv + buf * kRowVals * 64;
    const int64_t h = hk * G + gg, i0 = row_lo + qt * 64;

    constexpr int QH = S::QH, NH = QH / 8;
#pragma unroll
    for (int half = 0; half < 64 / QH; ++half) {
      const T* Qh = Qt + half * QH * LD;
      const T* dOh = dOt + half * QH * LD;
      float s[NH][4], dp[NH][4];
      zero_acc(s);
      zero_acc(dp);
      mma_abt<T, DP, LD, NH>(s, Ks + warp * 16 * LD, Qh, lane);                  // S^T: keys x queries
      if constexpr (DO_DK) mma_abt<T, DP, LD, NH>(dp, Vs + warp * 16 * LD, dOh, lane);  // dP^T
      // Element (nt, e): key jrow[e / 2], query i0 + c with c = half * QH + nt * 8 + 2 t4 + e % 2.
#pragma unroll
      for (int nt = 0; nt < NH; ++nt) {
        const int c0 = half * QH + nt * 8 + 2 * t4;
        if constexpr (FAST) {
          const float cq0 = rv[2 * 64 + c0], cq1 = rv[2 * 64 + c0 + 1];
          [[maybe_unused]] const float d0 = rv[3 * 64 + c0], d1 = rv[3 * 64 + c0 + 1];  // dS only with DO_DK
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pr = ex2(softmax_exp2_arg_scaled(s[nt][e], scale * l2e, (e & 1) ? cq1 : cq0));
            s[nt][e] = pr;
            if constexpr (DO_DK) dp[nt][e] = attn_dscore(pr, dp[nt][e], (e & 1) ? d1 : d0);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = c0 + (e & 1);
            const int64_t i = i0 + c, j = jrow[e >> 1];
            const float sc = masked_score(s[nt][e] * scale, p, b, h, i, j);
            const float pr = prob_of(sc, rv[c], rv[64 + c]);
            if constexpr (DO_DK) {
              const KLGradRow<float> klr{rv[4 * 64 + c], rv[5 * 64 + c], 0.0f, 0.0f};
              dp[nt][e] = dscore(p, b, h, i, j, sc, pr, dp[nt][e], rv[3 * 64 + c], klr);
            }
            s[nt][e] = pr;
          }
        }
      }
      if constexpr (DO_DV) mma_xb<T, DP, LD, NH>(dv, s, dOh, lane);   // dV += P^T dO
      if constexpr (DO_DK) mma_xb<T, DP, LD, NH>(dk, dp, Qh, lane);   // dK += dS^T Q
    }
    __syncthreads();  // the buffers are free for the stage two tiles ahead
  };
  // Per head: the diagonal tile (causal) and the tiles from the last full one on are general;
  // the rest, whose successor is a full tile of the same head, run the fast body.
  for (int64_t gg = 0; gg < G; ++gg) {
    const int64_t qa = p.causal ? 1 : 0;
    int64_t qb = general_all ? qa : nq_full - 1;
    if (!vec) qb = qa;
    if (qb < qa) qb = qa;
    if (qb > nq) qb = nq;
    int64_t qt = 0;
    for (; qt < qa && qt < nq; ++qt) step(gg, qt, std::false_type{});
    for (; qt < qb; ++qt) step(gg, qt, std::true_type{});
    for (; qt < nq; ++qt) step(gg, qt, std::false_type{});
  }
  cp_async_wait<0>();  // the K / V group when no query tile ran

  if constexpr (DO_DK) store_acc_rows(p.dk, dk, b, hk, n0 + warp * 16, p.N, p.D, scale, lane);
  if constexpr (DO_DV) store_acc_rows(p.dv, dv, b, hk, n0 + warp * 16, p.N, p.Dv, 1.0f, lane);
}

template <typename T, int DP>
__global__ void __launch_bounds__(kTcThreads, 1) attn_bwd_dq_tc_kernel(const AttnParams p, int64_t nmb) {
  using S = BwdShape<T, DP>;
  constexpr int LD = S::LD, NT = S::NT, OT = S::OT;
  LFI_DYNAMIC_SMEM(smem_f);
  T* Qs = reinterpret_cast<T*>(smem_f);
  T* dOs = Qs + 64 * LD;
  T* Ks = dOs + 64 * LD;  // two buffers
  T* Vs = Ks + 128 * LD;  // two buffers

  const int64_t pid = blockIdx.x, mb = pid % nmb, bh = pid / nmb;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g4 = lane >> 2;
  const int64_t r0 = mb * 64;
  const int64_t hi = p.causal ? (p.N < r0 + 64 ? p.N : r0 + 64) : p.N;
  const int64_t ntiles = (hi + 63) / 64;
  const float scale = static_cast<float>(p.scale), l2e = static_cast<float>(kLog2e);
  const RowSource<T> ksrc = row_source<T>(p.k, b, hk), vsrc = row_source<T>(p.v, b, hk);

  zero_padding<T, DP, LD>(Ks, 128, p.D);
  zero_padding<T, DP, LD>(Vs, 128, p.Dv);
  stage_rows<T, 64, DP, LD>(Qs, row_source<T>(p.q, b, h), r0, p.M, p.D);
  stage_rows<T, 64, DP, LD>(dOs, row_source<T>(p.grad_out, b, h), r0, p.M, p.Dv);
  cp_async_commit();

  const float* dl = static_cast<const float*>(p.delta);
  int64_t row[2];
  float mr[2], logl[2], cq[2], delta[2];
  KLGradRow<float> klr[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t i = r0 + warp * 16 + g4 + 8 * rr;
    row[rr] = i;
    row_stats(p.stats, bh, p.M, i, mr[rr], logl[rr]);
    cq[rr] = (mr[rr] + logl[rr]) * l2e;
    delta[rr] = i < p.M ? dl[bh * p.M + i] : 0.0f;
    klr[rr] = attn_kl_row(p, b, h, bh, i);
  }
  float dq[OT][4];
  zero_acc(dq);
  float* ds_out = static_cast<float*>(p.ds);

  const bool full_ok = ksrc.vec && vsrc.vec && p.D % 8 == 0 && p.Dv % 8 == 0;
  const int64_t nfull = full_ok ? (p.N / 64 < ntiles ? p.N / 64 : ntiles) : 0;
  int64_t nfast = 0;
  if (p.mask.ptr == nullptr && p.grad_kl.ptr == nullptr && p.grad_weights.ptr == nullptr && ds_out == nullptr &&
      scale > 0.0f) {
    nfast = p.causal && (r0 + 1) / 64 < nfull - 1 ? (r0 + 1) / 64 : nfull - 1;
    if (nfast < 0) nfast = 0;
  }
  auto stage = [&](int64_t tile, bool full) {
    stage_kv<T, DP, LD>(Ks, Vs, ksrc, vsrc, tile, full, true, p.N, p.D, p.Dv);
  };
  if (ntiles > 0) stage(0, nfull > 0);
  auto step = [&](int64_t it, auto fast_tag) {
    constexpr bool FAST = decltype(fast_tag)::value;
    pipeline_advance<FAST>([&](int64_t t) { stage(t, FAST || t < nfull); }, it, ntiles);
    const T* Kt = Ks + (it & 1) * 64 * LD;
    const T* Vt = Vs + (it & 1) * 64 * LD;
    const int64_t j0 = it * 64;
    float s[NT][4], dp[NT][4];
    zero_acc(s);
    zero_acc(dp);
    mma_abt<T, DP, LD, NT>(s, Qs + warp * 16 * LD, Kt, lane);    // S = Q K^T
    mma_abt<T, DP, LD, NT>(dp, dOs + warp * 16 * LD, Vt, lane);  // dP = dO V^T
    for_each_acc<NT>(lane, [&](int nt, int e, int rr, int c) {
      if constexpr (FAST) {
        const float pr = ex2(softmax_exp2_arg_scaled(s[nt][e], scale * l2e, cq[rr]));
        dp[nt][e] = attn_dscore(pr, dp[nt][e], delta[rr]);
      } else {
        const int64_t i = row[rr], j = j0 + c;
        const float sc = masked_score(s[nt][e] * scale, p, b, h, i, j);
        const float pr = prob_of(sc, mr[rr], logl[rr]);
        const float ds = dscore(p, b, h, i, j, sc, pr, dp[nt][e], delta[rr], klr[rr]);
        if (ds_out != nullptr && i < p.M && j < p.N) ds_out[(bh * p.M + i) * p.N + j] = ds;
        dp[nt][e] = ds;
      }
    });
    mma_xb<T, DP, LD, NT>(dq, dp, Kt, lane);  // dQ += dS K
    __syncthreads();
  };
  for (int64_t it = 0; it < nfast; ++it) step(it, std::true_type{});
  for (int64_t it = nfast; it < ntiles; ++it) step(it, std::false_type{});
  cp_async_wait<0>();

  store_acc_rows(p.dq, dq, b, h, r0 + warp * 16, p.M, p.D, scale, lane);
}

// The map rows' part of the backward pre-pass: delta[i] += sum_j P(i, j) G(i, j) for rows
// i in [w_start, w_stop), after attn_bwd_pre_kernel (attention.cu) has written rowsum(dO * O).
// One block per (64 rows of the map range, b, h): S = Q K^T per 64-key tile (K double-buffered),
// P = exp((s - m) - log l) from the saved statistics, the products with G summed per lane and
// over the quad at the end.
template <typename T, int DP>
__global__ void __launch_bounds__(kTcThreads, 2) attn_bwd_pre_maps_tc_kernel(const AttnParams p, int64_t nmb,
                                                                          int64_t mb0) {
  constexpr int LD = DP + 8, NT = 8;
  LFI_DYNAMIC_SMEM(smem_f);
  T* Qs = reinterpret_cast<T*>(smem_f);
  T* Ks = Qs + 64 * LD;  // two buffers
  const int64_t pid = blockIdx.x, mb = mb0 + pid % nmb, bh = pid / nmb;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g4 = lane >> 2, t4 = lane & 3;
  const int64_t r0 = mb * 64;
  const int64_t hi = p.causal ? (p.N < r0 + 64 ? p.N : r0 + 64) : p.N;
  const int64_t ntiles = (hi + 63) / 64;
  const float scale = static_cast<float>(p.scale);
  const RowSource<T> ksrc = row_source<T>(p.k, b, hk);
  const int64_t nfull = ksrc.vec && p.D % 8 == 0 ? (p.N / 64 < ntiles ? p.N / 64 : ntiles) : 0;

  zero_padding<T, DP, LD>(Ks, 128, p.D);
  stage_rows<T, 64, DP, LD>(Qs, row_source<T>(p.q, b, h), r0, p.M, p.D);
  cp_async_commit();
  auto stage = [&](int64_t tile) {
    stage_kv<T, DP, LD>(Ks, Ks, ksrc, ksrc, tile, tile < nfull, false, p.N, p.D, 0);
  };
  int64_t row[2], grow[2];
  bool in[2];
  float mr[2], logl[2], acc[2] = {0.0f, 0.0f};
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t i = r0 + warp * 16 + g4 + 8 * rr;
    row[rr] = i;
    in[rr] = i >= p.w_start && i < p.w_stop && i < p.M;
    row_stats(p.stats, bh, p.M, i, mr[rr], logl[rr]);  // only rows in[rr] are used
    grow[rr] = b * p.grad_weights.s[0] + h * p.grad_weights.s[1] + (i - p.w_start) * p.grad_weights.s[2];
  }
  if (ntiles > 0) stage(0);
  for (int64_t it = 0; it < ntiles; ++it) {
    pipeline_advance(stage, it, ntiles);
    float s[NT][4];
    zero_acc(s);
    mma_abt<T, DP, LD, NT>(s, Qs + warp * 16 * LD, Ks + (it & 1) * 64 * LD, lane);  // S = Q K^T
    for_each_acc<NT>(lane, [&](int nt, int e, int rr, int c) {
      const int64_t j = it * 64 + c;
      if (in[rr] && j < p.N) {
        const float pr = prob_of(masked_score(s[nt][e] * scale, p, b, h, row[rr], j), mr[rr], logl[rr]);
        acc[rr] += pr * ldf(p.grad_weights.ptr, grow[rr] + j * p.grad_weights.s[3], p.grad_weights.dtype);
      }
    });
    __syncthreads();
  }
  cp_async_wait<0>();
  float* delta = static_cast<float*>(p.delta);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float sum = quad_sum(acc[rr]);
    if (t4 == 0 && in[rr]) delta[bh * p.M + row[rr]] += sum;
  }
}

template <typename T, int DP>
const char* launch_bwd(const AttnParams& p, cudaStream_t stream) {
  if (p.grad_weights.ptr != nullptr && p.w_stop > p.w_start) {  // the map rows' part of delta first
    const int64_t mb0 = p.w_start / 64, nmb = (p.w_stop + 63) / 64 - mb0;
    const size_t smem = sizeof(T) * (DP + 8) * 64 * 3;
    void (*kernel)(const AttnParams, int64_t, int64_t) = attn_bwd_pre_maps_tc_kernel<T, DP>;
    LFI_CUDA_TRY(cuda_k::prepare(kernel, smem));
    LFI_LAUNCH(kernel, p.B * p.H * nmb, kTcThreads, smem, stream, p, nmb, mb0);
    if (const char* e = cuda_k::check_launch()) return e;
  }
  const size_t smem = BwdShape<T, DP>::smem;
  {
    const int64_t nnb = (p.N + 63) / 64;
    const int64_t grid = p.B * p.Hkv * nnb;
    if (grid > 0) {
      void (*kernels[2])(const AttnParams, int64_t) = {nullptr, nullptr};
      if constexpr (DP > 96) {  // dV, then dK (two launches: register budget)
        kernels[0] = attn_bwd_dkdv_tc_kernel<T, DP, false, true>;
        kernels[1] = attn_bwd_dkdv_tc_kernel<T, DP, true, false>;
      } else {
        kernels[0] = attn_bwd_dkdv_tc_kernel<T, DP, true, true>;
      }
      for (auto kernel : kernels) {
        if (kernel == nullptr) continue;
        LFI_CUDA_TRY(cuda_k::prepare(kernel, smem));
        LFI_LAUNCH(kernel, grid, kTcThreads, smem, stream, p, nnb);
        if (const char* e = cuda_k::check_launch()) return e;
      }
    }
  }
  const int64_t nmb = (p.M + 63) / 64;
  const int64_t grid = p.B * p.H * nmb;
  if (grid == 0) return nullptr;
  void (*kernel)(const AttnParams, int64_t) = attn_bwd_dq_tc_kernel<T, DP>;
  LFI_CUDA_TRY(cuda_k::prepare(kernel, smem));
  LFI_LAUNCH(kernel, grid, kTcThreads, smem, stream, p, nmb);
  return cuda_k::check_launch();
}

template <typename T, int DP>
const char* launch_fwd(const AttnParams& p, cudaStream_t stream) {
  const int64_t nmb = (p.M + kTcBM - 1) / kTcBM;
  const int64_t grid = p.B * p.H * nmb;
  if (grid == 0) return nullptr;
  const size_t smem = FwdShape<T, DP>::smem;
  void (*kernel)(const AttnParams, int64_t) = attn_fwd_tc_kernel<T, DP>;
  LFI_CUDA_TRY(cuda_k::prepare(kernel, smem));
  LFI_LAUNCH(kernel, grid, kTcThreads, smem, stream, p, nmb);
  return cuda_k::check_launch();
}

}  // namespace
}  // namespace tc

namespace cuda {

bool attention_forward_tc_applies(const AttnParams& p) {
  return (p.q.dtype == kBF16 || p.q.dtype == kF16) && p.k.dtype == p.q.dtype && p.v.dtype == p.q.dtype &&
         p.D <= 128 && p.Dv <= 128;
}

const char* attention_forward_tc(const AttnParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return tc::with_b16_and_head_dim(p.q.dtype, p.D > p.Dv ? p.D : p.Dv, [&](auto t, auto dp) {
    return tc::launch_fwd<typename decltype(t)::type, decltype(dp)::value>(p, s);
  });
}

const char* attention_backward_tc(const AttnParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return tc::with_b16_and_head_dim(p.q.dtype, p.D > p.Dv ? p.D : p.Dv, [&](auto t, auto dp) {
    return tc::launch_bwd<typename decltype(t)::type, decltype(dp)::value>(p, s);
  });
}

}  // namespace cuda
}  // namespace lfi
