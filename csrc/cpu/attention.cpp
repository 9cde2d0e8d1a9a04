// CPU kernels of interaction_attention (forward with exact maps and fused KL; backward).
//
// Forward: one task per (b, h, block of query rows), parallel with at::parallel_for. Keys are
// streamed in blocks of BN: each block of K (transposed) and V is converted once into contiguous
// compute-type buffers and used by every row of the task (scores for 4 rows per pass over the
// block), with the online softmax / KL updates of lfi_math.h. Rows that return maps keep their
// scores in a row buffer, so P = exp((s - m) - log l) is exact without recomputing Q K^T.
// Outputs the row statistics (m, log l) (B, H, M, 2).
//
// Backward: one task per (b, kv head, chunk of the group's query rows). Each row recomputes its
// scores, P, dP = dO V^T + G, delta and dS (+ the fused KL's g (P - t)); dq is written directly;
// dk and dv are accumulated in per-chunk buffers (no atomics) that a final pass sums.
#include <algorithm>
#include <memory>
#include <vector>

#include "../lfi_kernels.h"
#include "cpu_common.h"

namespace lfi {
namespace cpu {
namespace {

constexpr int64_t kBlockN = 128;  // keys per forward block (a multiple of kJW)
constexpr int64_t kRowGroup = 8;  // query rows per backward group

template <typename T>
void forward_impl(const AttnParams& p) {
  const int64_t B = p.B, H = p.H, M = p.M, N = p.N, D = p.D, Dv = p.Dv;
  const int64_t G = H / p.Hkv;
  const T scale = T(p.scale);
  const bool has_kl = p.kl_target.defined();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t RB = std::min<int64_t>(32, M);
  while (RB > 4 && B * H * ((M + RB - 1) / RB) < 4 * threads) RB = (RB + 1) / 2;
  const int64_t nmb = (M + RB - 1) / RB;
  const int64_t BN = std::min(kBlockN, padded(N));  // == ld of the key-block buffers
  const int64_t ldv = padded(Dv);
  T* stats = static_cast<T*>(p.stats);
  T* klo = static_cast<T*>(p.kl);
  T* tno = static_cast<T*>(p.tnorm);

  at::parallel_for(0, B * H * nmb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> kt(D * BN), vb(BN * ldv), q2(RB * D), acc(RB * ldv), S(RB * BN), tbuf(BN);
    std::vector<T> m(RB), l(RB), alpha(RB), tmp(std::max({D, Dv, BN, int64_t(1)}));
    std::vector<T> row(std::max<int64_t>(Dv, N));
    std::vector<KLSums<T>> kls(RB);
    std::vector<T> sbuf;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / nmb, mb = task % nmb;
      const int64_t b = bh / H, h = bh % H, hk = h / G;
      const int64_t r0 = mb * RB, R = std::min(RB, M - r0);
      for (int64_t r = 0; r < R; ++r) {
        T* qr = q2.data() + r * D;
        load_row(qr, p.q, off4(p.q, b, h, r0 + r, 0), p.q.s[3], D);
        for (int64_t d = 0; d < D; ++d) qr[d] *= scale;
        m[r] = neg_inf<T>();
        l[r] = T(0);
        kls[r] = kl_init<T>(false);
      }
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t mr0 = std::max(r0, p.w_start), mr1 = std::min(r0 + R, p.w_stop);
      const bool has_map = mr0 < mr1;
      if (has_map) sbuf.resize(RB * N);
      const int64_t hi = p.causal ? std::min(N, r0 + R) : N;

      for (int64_t j0 = 0; j0 < hi; j0 += BN) {
        const int64_t n = std::min(BN, hi - j0), nj = padded(n);
        pack_block(kt.data(), p.k, b, hk, j0, n, D, /*transpose=*/true, BN, tmp.data(), nj);
        pack_block(vb.data(), p.v, b, hk, j0, n, Dv, /*transpose=*/false, ldv, tmp.data(), ldv);
        gemm_rows(S.data(), BN, q2.data(), D, R, D, kt.data(), BN, nj, /*accumulate=*/false);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = r0 + r;
          T* s = S.data() + r * BN;
          // Causal: row i sees keys j <= i only.
          const int64_t nv = p.causal ? std::max<int64_t>(0, std::min(n, i + 1 - j0)) : n;
          alpha[r] = T(1);
          if (nv == 0) {
            std::fill(s, s + nj, T(0));
            continue;
          }
          apply_mask_row(s, p.mask, p.mask_bool, b, h, i, j0, nv, tmp.data());
          const T sh_old = shift_of(m[r]);
          alpha[r] = softmax_rescale(m[r], l[r], max_n(s, nv));
          const T sh = shift_of(m[r]);
          if (has_kl) {
            load_row(tbuf.data(), p.kl_target, off4(p.kl_target, b, h, i, j0), p.kl_target.s[3], nv);
            kl_rescale(kls[r], sh_old, sh, T(0), false);
            KLSums<T> part = kl_zero<T>();
            for (int64_t j = 0; j < nv; ++j) kl_add(part, s[j], tbuf[j], s[j] > neg_inf<T>(), sh, T(0), T(0), false);
            kl_merge(kls[r], part, false);
          }
          if (has_map && i >= mr0 && i < mr1) std::copy(s, s + nv, sbuf.data() + r * N + j0);
          exp_shifted(s, s, sh, T(0), nv);  // the row becomes P (relative to the running max)
          std::fill(s + nv, s + nj, T(0));
          l[r] += sum_n(s, nv);
          if (alpha[r] != T(1)) {
            T* a = acc.data() + r * ldv;
            for (int64_t e = 0; e < ldv; ++e) a[e] *= alpha[r];
          }
        }
        gemm_rows(acc.data(), ldv, S.data(), BN, R, n, vb.data(), ldv, ldv, /*accumulate=*/true);
      }

      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r0 + r;
        const T mr = shift_of(m[r]), log_l = log_l_of(l[r], p.mask.defined());
        stats[2 * (bh * M + i)] = mr;
        stats[2 * (bh * M + i) + 1] = log_l;
        const T* a = acc.data() + r * ldv;
        // 0 on empty rows (also where acc holds 0 * NaN), NaN on NaN rows
        for (int64_t e = 0; e < Dv; ++e) row[e] = out_of(a[e], l[r], p.mask.defined());
        store_row(p.out, off4(p.out, b, h, i, 0), p.out.s[3], row.data(), Dv);
        if (has_kl) {
          T kl, tn;
          T t_shift;
          kl_finish(kls[r], log_l, false, kl, t_shift, tn);
          klo[bh * M + i] = kl;
          tno[bh * M + i] = tn;
        }
        if (has_map && i >= mr0 && i < mr1) {
          const int64_t hi_i = p.causal ? std::min(N, i + 1) : N;
          const T* sr = sbuf.data() + r * N;
          for (int64_t j = 0; j < hi_i; ++j) row[j] = prob_of(sr[j], mr, log_l);
          // Keys past the causal diagonal: P of a -inf score, i.e. 0, or NaN on a NaN row (its whole row
          // is NaN, as in eager softmax).
          std::fill(row.begin() + hi_i, row.begin() + N, prob_of(neg_inf<T>(), mr, log_l));
          store_row(p.weights, off4(p.weights, b, h, i - p.w_start, 0), p.weights.s[3], row.data(), N);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const AttnParams& p) {
  const int64_t B = p.B, H = p.H, Hkv = p.Hkv, M = p.M, N = p.N, D = p.D, Dv = p.Dv;
  const int64_t G = H / Hkv;
  const T scale = T(p.scale);
  const bool has_kl = p.grad_kl.defined();
  const bool has_dw = p.grad_weights.defined();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows = G * M;
  const int64_t C = chunks_for(rows, B * Hkv, 16, threads);
  const int64_t per_chunk = (rows + C - 1) / C;
  const int64_t ldn = padded(N), ldd = padded(D), lddv = padded(Dv);
  const T* stats = static_cast<const T*>(p.stats);
  const T* tnorm = static_cast<const T*>(p.tnorm);
  T* ds_out = static_cast<T*>(p.ds);
  const int64_t kv_elems = B * Hkv * N;
  std::unique_ptr<T[]> ws_k(new T[C * kv_elems * ldd]);
  std::unique_ptr<T[]> ws_v(new T[C * kv_elems * lddv]);
  constexpr int64_t RG = kRowGroup;

  at::parallel_for(0, B * Hkv * C, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> kt(D * ldn), kr(N * ldd), vt(Dv * ldn), tmp(std::max({D, Dv, N}));
    std::vector<T> q(RG * ldd), q2(RG * D), dO(RG * lddv), o(Dv), dq(RG * ldd);
    std::vector<T> S(RG * ldn), P(RG * ldn), DP(RG * ldn), tb(N), gb(N);
    std::vector<int64_t> hi_r(RG), ii(RG), hh(RG);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c = task % C, bhk = task / C;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv;
      T* dkp = ws_k.get() + (c * kv_elems + bhk * N) * ldd;
      T* dvp = ws_v.get() + (c * kv_elems + bhk * N) * lddv;
      std::fill(dkp, dkp + N * ldd, T(0));
      std::fill(dvp, dvp + N * lddv, T(0));
      const int64_t f0 = c * per_chunk, f1 = std::min(rows, f0 + per_chunk);
      if (f0 >= f1) continue;
      int64_t nk = N;
      if (p.causal) {
        nk = 0;
        for (int64_t f = f0; f < f1; ++f) nk = std::max(nk, std::min(N, f % M + 1));
      }
      pack_block(kt.data(), p.k, b, hk, 0, nk, D, true, ldn, tmp.data(), padded(nk));
      pack_block(kr.data(), p.k, b, hk, 0, nk, D, false, ldd, tmp.data(), ldd);
      pack_block(vt.data(), p.v, b, hk, 0, nk, Dv, true, ldn, tmp.data(), padded(nk));
      for (int64_t g0 = f0; g0 < f1; g0 += RG) {
        const int64_t R = std::min(RG, f1 - g0);
        int64_t hi_g = 0;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t f = g0 + r;
          ii[r] = f % M;
          hh[r] = hk * G + f / M;
          hi_r[r] = p.causal ? std::min(N, ii[r] + 1) : N;
          hi_g = std::max(hi_g, hi_r[r]);
          T* qr = q.data() + r * ldd;
          load_row(qr, p.q, off4(p.q, b, hh[r], ii[r], 0), p.q.s[3], D);
          std::fill(qr + D, qr + ldd, T(0));
          for (int64_t d = 0; d < D; ++d) q2[r * D + d] = qr[d] * scale;
          T* dor = dO.data() + r * lddv;
          load_row(dor, p.grad_out, off4(p.grad_out, b, hh[r], ii[r], 0), p.grad_out.s[3], Dv);
          std::fill(dor + Dv, dor + lddv, T(0));
        }
        const int64_t nj = padded(hi_g);
        gemm_rows(S.data(), ldn, q2.data(), D, R, D, kt.data(), ldn, nj, false);
        gemm_rows(DP.data(), ldn, dO.data(), lddv, R, Dv, vt.data(), ldn, nj, false);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = ii[r], h = hh[r], bh = b * H + h, hi = hi_r[r];
          T* s = S.data() + r * ldn;
          T* pr = P.data() + r * ldn;
          T* dp = DP.data() + r * ldn;
          const T mr = stats[2 * (bh * M + i)], log_l = stats[2 * (bh * M + i) + 1];
          if (empty_row(log_l)) {  // no attended key: every gradient of the row is 0 (a NaN row propagates)
            std::fill(pr, pr + nj, T(0));
            std::fill(s, s + nj, T(0));  // s becomes dS
            if (ds_out) std::fill(ds_out + (bh * M + i) * N, ds_out + (bh * M + i + 1) * N, T(0));
            continue;
          }
          apply_mask_row(s, p.mask, p.mask_bool, b, h, i, 0, hi, tmp.data());
          exp_shifted(pr, s, mr, log_l, hi);
          std::fill(pr + hi, pr + nj, T(0));
          load_row(o.data(), p.out, off4(p.out, b, h, i, 0), p.out.s[3], Dv);
          T delta = dot_n(dO.data() + r * lddv, o.data(), Dv);
          if (has_dw && i >= p.w_start && i < p.w_stop) {
            load_row(gb.data(), p.grad_weights, off4(p.grad_weights, b, h, i - p.w_start, 0), p.grad_weights.s[3],
                     hi);
            for (int64_t j = 0; j < hi; ++j) dp[j] += gb[j];
            delta += dot_n(pr, gb.data(), hi);
          }
          if (has_kl) {
            const T gk = load1<T>(p.grad_kl, b * p.grad_kl.s[0] + h * p.grad_kl.s[1] + i * p.grad_kl.s[2]);
            const KLGradRow<T> kgr = kl_grad_row(gk, T(0), tnorm[bh * M + i], false);
            load_row(tb.data(), p.kl_target, off4(p.kl_target, b, h, i, 0), p.kl_target.s[3], hi);
            for (int64_t j = 0; j < hi; ++j)
              s[j] = attn_dscore(pr[j], dp[j], delta) + kl_dscore(pr[j], tb[j], s[j] > neg_inf<T>(), kgr, T(0), false);
          } else {
            for (int64_t j = 0; j < hi; ++j) s[j] = attn_dscore(pr[j], dp[j], delta);
          }
          std::fill(s + hi, s + nj, T(0));  // S now holds dS
          if (ds_out) {
            T* dsr = ds_out + (bh * M + i) * N;
            std::copy(s, s + hi, dsr);
            std::fill(dsr + hi, dsr + N, T(0));
          }
        }
        // dQ = scale dS K; dK += dS^T Q (scaled at the end); dV += P^T dO.
        gemm_rows(dq.data(), ldd, S.data(), ldn, R, hi_g, kr.data(), ldd, ldd, false);
        for (int64_t r = 0; r < R; ++r) {
          T* dqr = dq.data() + r * ldd;
          for (int64_t d = 0; d < D; ++d) dqr[d] *= scale;
          store_row(p.dq, off4(p.dq, b, hh[r], ii[r], 0), p.dq.s[3], dqr, D);
        }
        gemm_tn_acc(dkp, ldd, S.data(), ldn, R, hi_g, q.data(), ldd, ldd);
        gemm_tn_acc(dvp, lddv, P.data(), ldn, R, hi_g, dO.data(), lddv, lddv);
      }
    }
  });

  // dk = scale * sum over chunks, dv = sum over chunks, converted to their dtypes.
  at::parallel_for(0, kv_elems, 16, [&](int64_t r0, int64_t r1) {
    std::vector<T> row(std::max(ldd, lddv));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (Hkv * N), hk = (r / N) % Hkv, j = r % N;
      std::fill(row.begin(), row.end(), T(0));
      for (int64_t c = 0; c < C; ++c) axpy(row.data(), scale, ws_k.get() + (c * kv_elems + r) * ldd, D);
      store_row(p.dk, off4(p.dk, b, hk, j, 0), p.dk.s[3], row.data(), D);
      std::fill(row.begin(), row.end(), T(0));
      for (int64_t c = 0; c < C; ++c) axpy(row.data(), T(1), ws_v.get() + (c * kv_elems + r) * lddv, Dv);
      store_row(p.dv, off4(p.dv, b, hk, j, 0), p.dv.s[3], row.data(), Dv);
    }
  });
}

}  // namespace

void attention_forward(const AttnParams& p, bool acc_double) {
  if (acc_double) forward_impl<double>(p);
  else forward_impl<float>(p);
}

void attention_backward(const AttnParams& p, bool acc_double) {
  if (acc_double) backward_impl<double>(p);
  else backward_impl<float>(p);
}

}  // namespace cpu
}  // namespace lfi
