// CPU kernels of attention_kl (dense student logits) and attention_kl_qk (student logits
// q k^T * scale and, optionally, teacher logits q_t k_t^T * scale_t computed on the fly).
// Per row the math is the one of lfi_math.h (online softmax + KLSums with one tile per row: the
// row's scores live in a buffer); rows are processed in parallel with at::parallel_for.
// attention_kl_qk backward: one task per (b, kv head, chunk of the group's rows), dq written
// directly, dk accumulated per chunk and summed at the end (no atomics).
#include <algorithm>
#include <memory>
#include <vector>

#include "../lfi_kernels.h"
#include "cpu_common.h"

namespace lfi {
namespace cpu {
namespace {

// Row statistics of KL(t || softmax(s)) for student scores s2 (-inf where not kept), raw target
// values tg and the keep flags (1 / 0) of n keys; the row is one tile.
template <typename T>
void kl_row(const T* s2, const T* tg, const T* keep, int64_t n, T t_scale2, bool logits, T* tmp, T& kl,
            T* stats, T* tstats) {
  T m = neg_inf<T>(), l = T(0);
  softmax_rescale(m, l, max_n(s2, n));
  const T sh = shift_of(m);
  exp_shifted(tmp, s2, sh, T(0), n);
  l += sum_n(tmp, n);
  KLSums<T> st = kl_init<T>(logits);
  T mu = T(0);
  if (logits) {
    for (int64_t j = 0; j < n; ++j) tmp[j] = kl_u(tg[j], keep[j] != T(0), t_scale2);
    mu = max_n(tmp, n);
  }
  kl_rescale(st, T(0), sh, mu, logits);
  const T shu = shift_of(mu);
  KLSums<T> part = kl_zero<T>();
  if (logits) {
    for (int64_t j = 0; j < n; ++j) kl_add(part, s2[j], tg[j], keep[j] != T(0), sh, shu, t_scale2, true);
  } else {
    for (int64_t j = 0; j < n; ++j) kl_add(part, s2[j], tg[j], keep[j] != T(0), sh, shu, t_scale2, false);
  }
  kl_merge(st, part, logits);
  kl_finish(st, log_l_of(l), logits, kl, tstats[0], tstats[1]);
  stats[0] = shift_of(m);
  stats[1] = log_l_of(l);
}

// g * (p - t) of row r into ds (N keys), from the saved row statistics.
template <typename T>
void kl_row_grad(T* ds, const T* s, const T* tg, const T* keep, int64_t N, T g, const T* stats, const T* tstats,
                 int64_t r, T t_scale2, bool logits) {
  const KLGradRow<T> row = kl_grad_row(g, tstats[2 * r], tstats[2 * r + 1], logits);
  const T m = stats[2 * r], log_l = stats[2 * r + 1];
  for (int64_t j = 0; j < N; ++j) ds[j] = prob_of(s[j], m, log_l);
  if (logits) {
    for (int64_t j = 0; j < N; ++j) ds[j] = kl_dscore(ds[j], tg[j], keep[j] != T(0), row, t_scale2, true);
  } else {
    for (int64_t j = 0; j < N; ++j) ds[j] = kl_dscore(ds[j], tg[j], keep[j] != T(0), row, t_scale2, false);
  }
}

// keep[j] = key_mask(b, h, i, j) (1 without a mask); s2[j] = keep ? s2[j] : -inf.
template <typename T>
void keep_row(T* keep, T* s2, const Strided& mask, int64_t b, int64_t h, int64_t i, int64_t n) {
  if (!mask.defined()) {
    std::fill(keep, keep + n, T(1));
    return;
  }
  load_row(keep, mask, off4(mask, b, h, i, 0), mask.s[3], n);
  const T ninf = neg_inf<T>();
  for (int64_t j = 0; j < n; ++j) s2[j] = keep[j] != T(0) ? s2[j] : ninf;
}

// attention_kl: calls row_fn(r, b, h, i, s, tg, keep, tmp) for every row r = (b, h, i) of the
// dense logits, in parallel, with the row's student scores (times student_scale, -inf where not
// kept), raw target values and keep flags loaded, and a scratch row of N values.
template <typename T, typename RowFn>
void for_each_dense_row(const KLParams& p, RowFn row_fn) {
  const int64_t H = p.H, M = p.M, N = p.N;
  const T s_scale2 = T(p.student_scale);
  at::parallel_for(0, p.B * H * M, 8, [&](int64_t r0, int64_t r1) {
    std::vector<T> s(N), tg(N), keep(N), tmp(N);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * M), h = (r / M) % H, i = r % M;
      load_row(s.data(), p.logits, off4(p.logits, b, h, i, 0), p.logits.s[3], N);
      for (int64_t j = 0; j < N; ++j) s[j] *= s_scale2;
      load_row(tg.data(), p.target, off4(p.target, b, h, i, 0), p.target.s[3], N);
      keep_row(keep.data(), s.data(), p.key_mask, b, h, i, N);
      row_fn(r, b, h, i, s.data(), tg.data(), keep.data(), tmp.data());
    }
  });
}

// grad_kl at row (b, h, i) (read with broadcast strides).
template <typename T>
T grad_of(const KLParams& p, int64_t b, int64_t h, int64_t i) {
  return load1<T>(p.grad_kl, b * p.grad_kl.s[0] + h * p.grad_kl.s[1] + i * p.grad_kl.s[2]);
}

template <typename T>
void kl_forward_impl(const KLParams& p) {
  const T t_scale2 = T(p.target_scale);
  T* klo = static_cast<T*>(p.kl);
  T* so = static_cast<T*>(p.stats);
  T* tso = static_cast<T*>(p.tstats);
  for_each_dense_row<T>(p, [&](int64_t r, int64_t, int64_t, int64_t, const T* s, const T* tg, const T* keep, T* tmp) {
    kl_row(s, tg, keep, p.N, t_scale2, p.target_is_logits, tmp, klo[r], so + 2 * r, tso + 2 * r);
  });
}

template <typename T>
void kl_backward_impl(const KLParams& p) {
  const T t_scale2 = T(p.target_scale), s_scale2 = T(p.student_scale);
  const T* stats = static_cast<const T*>(p.stats);
  const T* tstats = static_cast<const T*>(p.tstats);
  for_each_dense_row<T>(p, [&](int64_t r, int64_t b, int64_t h, int64_t i, const T* s, const T* tg, const T* keep,
                               T* ds) {
    kl_row_grad(ds, s, tg, keep, p.N, grad_of<T>(p, b, h, i) * s_scale2, stats, tstats, r, t_scale2,
                p.target_is_logits);
    store_row(p.dlogits, off4(p.dlogits, b, h, i, 0), p.dlogits.s[3], ds, p.N);
  });
}

// attention_kl_qk: shared row setup (student scores, target values, keep flags) for row i of
// query head h, given the packed student keys kt (D x N) and teacher keys ktt (Dt x N).
template <typename T>
struct QKRows {
  const KLParams& p;
  T s_scale2;
  std::vector<T> q, qt, s, tg, keep, tmp;
  QKRows(const KLParams& p_) : p(p_), s_scale2(T(p_.student_scale)) {
    q.resize(p.D);
    qt.resize(std::max<int64_t>(1, p.Dt));
    s.resize(p.N);
    tg.resize(p.N);
    keep.resize(p.N);
    tmp.resize(std::max({p.N, p.D, p.Dt, int64_t(1)}));
  }
  int64_t teacher_head(int64_t h) const { return p.Ht == p.H ? h : 0; }
  void compute(int64_t b, int64_t h, int64_t i, const T* kt, const T* ktt) {
    const int64_t N = p.N;
    load_row(q.data(), p.q, off4(p.q, b, h, i, 0), p.q.s[3], p.D);
    for (int64_t d = 0; d < p.D; ++d) tmp[d] = q[d] * s_scale2;
    scores_rows(s.data(), tmp.data(), 1, kt, p.D, N, N);
    if (p.implicit) {
      const int64_t ht = teacher_head(h);
      load_row(qt.data(), p.q_t, off4(p.q_t, b, ht, i, 0), p.q_t.s[3], p.Dt);
      scores_rows(tg.data(), qt.data(), 1, ktt, p.Dt, N, N);
    } else {
      load_row(tg.data(), p.target, off4(p.target, b, h, i, 0), p.target.s[3], N);
    }
    keep_row(keep.data(), s.data(), p.key_mask, b, h, i, N);
  }
};

template <typename T>
void kl_qk_forward_impl(const KLParams& p) {
  const int64_t B = p.B, H = p.H, M = p.M, N = p.N, D = p.D, Dt = p.Dt;
  const int64_t G = H / p.Hkv;
  const T t_scale2 = T(p.target_scale);
  const bool logits = p.target_is_logits || p.implicit;
  T* klo = static_cast<T*>(p.kl);
  T* so = static_cast<T*>(p.stats);
  T* tso = static_cast<T*>(p.tstats);
  const int64_t C = chunks_for(M, B * H, 16, M);
  const int64_t per = (M + C - 1) / C;
  at::parallel_for(0, B * H * C, 1, [&](int64_t t0, int64_t t1) {
    QKRows<T> rows(p);
    std::vector<T> kt(D * N), ktt(p.implicit ? Dt * N : 1), tmp(std::max({D, Dt, int64_t(1)})), e(N);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / C, c = task % C;
      const int64_t b = bh / H, h = bh % H;
      const int64_t i0 = c * per, i1 = std::min(M, i0 + per);
      if (i0 >= i1) continue;
      pack_block(kt.data(), p.k, b, h / G, 0, N, D, true, N, tmp.data());
      if (p.implicit) {
        const int64_t htk = rows.teacher_head(h) / (p.Ht / p.Htk);
        pack_block(ktt.data(), p.k_t, b, htk, 0, N, Dt, true, N, tmp.data());
      }
      for (int64_t i = i0; i < i1; ++i) {
        rows.compute(b, h, i, kt.data(), ktt.data());
        const int64_t r = bh * M + i;
        kl_row(rows.s.data(), rows.tg.data(), rows.keep.data(), N, t_scale2, logits, e.data(), klo[r], so + 2 * r,
               tso + 2 * r);
      }
    }
  });
}

template <typename T>
void kl_qk_backward_impl(const KLParams& p) {
  const int64_t B = p.B, H = p.H, Hkv = p.Hkv, M = p.M, N = p.N, D = p.D, Dt = p.Dt;
  const int64_t G = H / Hkv;
  const T t_scale2 = T(p.target_scale), sscale = T(p.student_scale);
  const bool logits = p.target_is_logits || p.implicit;
  const T* stats = static_cast<const T*>(p.stats);
  const T* tstats = static_cast<const T*>(p.tstats);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows_n = G * M;
  const int64_t C = chunks_for(rows_n, B * Hkv, 16, threads);
  const int64_t per = (rows_n + C - 1) / C;
  const int64_t kv_elems = B * Hkv * N;
  std::unique_ptr<T[]> ws(new T[C * kv_elems * D]);

  at::parallel_for(0, B * Hkv * C, 1, [&](int64_t t0, int64_t t1) {
    QKRows<T> rows(p);
    std::vector<T> kt(D * N), kr(N * D), ktt(p.implicit ? Dt * N : 1), tmp(std::max({D, Dt, int64_t(1)}));
    std::vector<T> ds(N), dq(D);
    int64_t packed_htk = -1;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c = task % C, bhk = task / C;
      const int64_t b = bhk / Hkv, hk = bhk % Hkv;
      T* dkp = ws.get() + (c * kv_elems + bhk * N) * D;
      std::fill(dkp, dkp + N * D, T(0));
      const int64_t f0 = c * per, f1 = std::min(rows_n, f0 + per);
      if (f0 >= f1) continue;
      pack_block(kt.data(), p.k, b, hk, 0, N, D, true, N, tmp.data());
      pack_block(kr.data(), p.k, b, hk, 0, N, D, false, D, tmp.data());
      packed_htk = -1;
      for (int64_t f = f0; f < f1; ++f) {
        const int64_t g = f / M, i = f % M;
        const int64_t h = hk * G + g, r = (b * H + h) * M + i;
        if (p.implicit) {
          const int64_t htk = rows.teacher_head(h) / (p.Ht / p.Htk);
          if (htk != packed_htk) {
            pack_block(ktt.data(), p.k_t, b, htk, 0, N, Dt, true, N, tmp.data());
            packed_htk = htk;
          }
        }
        rows.compute(b, h, i, kt.data(), ktt.data());
        const T gk = grad_of<T>(p, b, h, i);
        kl_row_grad(ds.data(), rows.s.data(), rows.tg.data(), rows.keep.data(), N, gk, stats, tstats, r, t_scale2,
                    logits);
        std::fill(dq.begin(), dq.end(), T(0));
        const T* q = rows.q.data();
        for (int64_t j = 0; j < N; ++j) {
          if (ds[j] == T(0)) continue;
          axpy(dq.data(), ds[j], kr.data() + j * D, D);
          axpy(dkp + j * D, ds[j], q, D);
        }
        for (int64_t d = 0; d < D; ++d) dq[d] *= sscale;
        store_row(p.dq, off4(p.dq, b, h, i, 0), p.dq.s[3], dq.data(), D);
      }
    }
  });

  at::parallel_for(0, kv_elems, 16, [&](int64_t r0, int64_t r1) {
    std::vector<T> row(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (Hkv * N), hk = (r / N) % Hkv, j = r % N;
      std::fill(row.begin(), row.end(), T(0));
      for (int64_t c = 0; c < C; ++c) axpy(row.data(), sscale, ws.get() + (c * kv_elems + r) * D, D);
      store_row(p.dk, off4(p.dk, b, hk, j, 0), p.dk.s[3], row.data(), D);
    }
  });
}

}  // namespace

void kl_forward(const KLParams& p, bool d) { d ? kl_forward_impl<double>(p) : kl_forward_impl<float>(p); }
void kl_backward(const KLParams& p, bool d) { d ? kl_backward_impl<double>(p) : kl_backward_impl<float>(p); }
void kl_qk_forward(const KLParams& p, bool d) { d ? kl_qk_forward_impl<double>(p) : kl_qk_forward_impl<float>(p); }
void kl_qk_backward(const KLParams& p, bool d) { d ? kl_qk_backward_impl<double>(p) : kl_qk_backward_impl<float>(p); }

}  // namespace cpu
}  // namespace lfi
