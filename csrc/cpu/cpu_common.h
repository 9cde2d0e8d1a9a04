// Helpers of the CPU kernels: dtype-converting row loads/stores through strides, packing of K/V
// blocks into contiguous compute-type buffers, small reductions written so that they vectorise.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../lfi_math.h"
#include "../lfi_params.h"

namespace lfi {
namespace cpu {

template <typename T, typename S>
inline void load_row_impl(T* dst, const S* src, int64_t stride, int64_t n) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i * stride]));
  }
}

template <typename T>
inline void load_row_impl(T* dst, const double* src, int64_t stride, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i * stride]);
}

// dst[i] = t[off + i * stride] converted to T, for i < n.
template <typename T>
inline void load_row(T* dst, const Strided& t, int64_t off, int64_t stride, int64_t n) {
  const char* base = static_cast<const char*>(t.ptr);
  switch (t.dtype) {
    case kF16: load_row_impl(dst, reinterpret_cast<const c10::Half*>(base) + off, stride, n); break;
    case kBF16: load_row_impl(dst, reinterpret_cast<const c10::BFloat16*>(base) + off, stride, n); break;
    case kF32: load_row_impl(dst, reinterpret_cast<const float*>(base) + off, stride, n); break;
    case kF64: load_row_impl(dst, reinterpret_cast<const double*>(base) + off, stride, n); break;
    default: load_row_impl(dst, reinterpret_cast<const uint8_t*>(base) + off, stride, n); break;
  }
}

template <typename T>
inline T load1(const Strided& t, int64_t off) {
  T v;
  load_row(&v, t, off, 1, 1);
  return v;
}

template <typename S, typename T>
inline void store_row_impl(S* dst, int64_t stride, const T* src, int64_t n) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<S>(src[i]);
  }
}

// t[off + i * stride] = src[i] * mul, converted to t's dtype (float types only).
template <typename T>
inline void store_row(const Strided& t, int64_t off, int64_t stride, const T* src, int64_t n) {
  char* base = static_cast<char*>(t.ptr);
  switch (t.dtype) {
    case kF16: store_row_impl(reinterpret_cast<c10::Half*>(base) + off, stride, src, n); break;
    case kBF16: store_row_impl(reinterpret_cast<c10::BFloat16*>(base) + off, stride, src, n); break;
    case kF32: store_row_impl(reinterpret_cast<float*>(base) + off, stride, src, n); break;
    default: store_row_impl(reinterpret_cast<double*>(base) + off, stride, src, n); break;
  }
}

inline int64_t off4(const Strided& t, int64_t a, int64_t b, int64_t c, int64_t d) {
  return a * t.s[0] + b * t.s[1] + c * t.s[2] + d * t.s[3];
}

// Adds a float mask row to the scores, or sets -inf where a bool mask is false, for keys
// [j0, j0 + n) of row (b, h, i).
template <typename T>
inline void apply_mask_row(T* s, const Strided& mask, bool is_bool, int64_t b, int64_t h, int64_t i, int64_t j0,
                           int64_t n, T* tmp) {
  if (!mask.defined()) return;
  const int64_t off = off4(mask, b, h, i, j0);
  const int64_t st = mask.s[3];
  if (is_bool) {
    const uint8_t* m = static_cast<const uint8_t*>(mask.ptr) + off;
    const T ninf = neg_inf<T>();
    if (st == 1) {
      for (int64_t j = 0; j < n; ++j) s[j] = m[j] ? s[j] : ninf;
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] = m[j * st] ? s[j] : ninf;
    }
  } else {
    load_row(tmp, mask, off, st, n);
    for (int64_t j = 0; j < n; ++j) s[j] += tmp[j];
  }
}

// Reductions with independent accumulators (no -ffast-math needed to vectorise them).
template <typename T>
inline T max_n(const T* x, int64_t n) {
  constexpr int W = 8;
  T acc[W];
  for (int w = 0; w < W; ++w) acc[w] = neg_inf<T>();
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int w = 0; w < W; ++w) acc[w] = x[i + w] > acc[w] ? x[i + w] : acc[w];
  for (; i < n; ++i) acc[0] = x[i] > acc[0] ? x[i] : acc[0];
  T m = acc[0];
  for (int w = 1; w < W; ++w) m = acc[w] > m ? acc[w] : m;
  return m;
}

template <typename T>
inline T sum_n(const T* x, int64_t n) {
  constexpr int W = 8;
  T acc[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int w = 0; w < W; ++w) acc[w] += x[i + w];
  for (; i < n; ++i) acc[0] += x[i];
  T s = T(0);
  for (int w = 0; w < W; ++w) s += acc[w];
  return s;
}

template <typename T>
inline T dot_n(const T* x, const T* y, int64_t n) {
  constexpr int W = 8;
  T acc[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int w = 0; w < W; ++w) acc[w] += x[i + w] * y[i + w];
  for (; i < n; ++i) acc[0] += x[i] * y[i];
  T s = T(0);
  for (int w = 0; w < W; ++w) s += acc[w];
  return s;
}

// out[j] = exp((s[j] - shift) - sub) for j < n.
template <typename T>
inline void exp_shifted(T* out, const T* s, T shift, T sub, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = exp_((s[j] - shift) - sub);
}

// y[j] += a * x[j]
template <typename T>
inline void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// Scores of `R` rows against a packed key block kt (D x ld, row d holds key components d):
// s[r * ld + j] = sum_d q[r * D + d] * kt[d * ld + j] for j < n. R rows share each kt load.
template <typename T>
inline void scores_rows(T* __restrict s, const T* __restrict q, int64_t R, const T* __restrict kt, int64_t D,
                        int64_t ld, int64_t n) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    T* s0 = s + r * ld;
    T* s1 = s0 + ld;
    T* s2 = s1 + ld;
    T* s3 = s2 + ld;
    std::fill(s0, s0 + n, T(0));
    std::fill(s1, s1 + n, T(0));
    std::fill(s2, s2 + n, T(0));
    std::fill(s3, s3 + n, T(0));
    const T* q0 = q + r * D;
    for (int64_t d = 0; d < D; ++d) {
      const T a0 = q0[d], a1 = q0[D + d], a2 = q0[2 * D + d], a3 = q0[3 * D + d];
      const T* k = kt + d * ld;
      for (int64_t j = 0; j < n; ++j) {
        const T kv = k[j];
        s0[j] += a0 * kv;
        s1[j] += a1 * kv;
        s2[j] += a2 * kv;
        s3[j] += a3 * kv;
      }
    }
  }
  for (; r < R; ++r) {
    T* s0 = s + r * ld;
    std::fill(s0, s0 + n, T(0));
    const T* q0 = q + r * D;
    for (int64_t d = 0; d < D; ++d) axpy(s0, q0[d], kt + d * ld, n);
  }
}

// Padded leading dimension: a multiple of the micro-kernels' column width.
constexpr int64_t kJW = 16;
inline int64_t padded(int64_t n) { return (n + kJW - 1) / kJW * kJW; }

// SIMD vectors (GCC/Clang vector extensions) of the widest registers the build targets: 32 bytes
// with AVX (the JIT build adds -mavx2 -mfma where the CPU has them), else 16 bytes (SSE2).
// Unaligned loads and stores go through memcpy.
#if defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
template <typename T>
struct VecN {
  typedef T type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using vec_t = typename VecN<T>::type;
template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void vstore(T* p, const vec_t<T>& v) {
  std::memcpy(p, &v, sizeof v);
}

// C[r][j] (+)= sum_k A[r][k] * B[k][j] for r < R, j < ncols (a multiple of kJW; B and C padded),
// k < K. Register-blocked: 4 rows x kJW columns of C stay in vector registers while k runs.
template <typename T>
inline void gemm_rows(T* __restrict C, int64_t ldc, const T* __restrict A, int64_t lda, int64_t R, int64_t K,
                      const T* __restrict B, int64_t ldb, int64_t ncols, bool accumulate) {
  using V = vec_t<T>;
  constexpr int L = static_cast<int>(kVecBytes / sizeof(T));  // lanes per vector
  constexpr int NV = static_cast<int>(kJW) / L;         // vectors per block row
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const T* a0 = A + r * lda;
    T* c0 = C + r * ldc;
    for (int64_t j0 = 0; j0 < ncols; j0 += kJW) {
      V x0[NV], x1[NV], x2[NV], x3[NV];
      for (int v = 0; v < NV; ++v) {
        if (accumulate) {
          x0[v] = vload(c0 + j0 + v * L);
          x1[v] = vload(c0 + ldc + j0 + v * L);
          x2[v] = vload(c0 + 2 * ldc + j0 + v * L);
          x3[v] = vload(c0 + 3 * ldc + j0 + v * L);
        } else {
          x0[v] = x1[v] = x2[v] = x3[v] = V{};
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        const T* b = B + k * ldb + j0;
        const T s0 = a0[k], s1 = a0[lda + k], s2 = a0[2 * lda + k], s3 = a0[3 * lda + k];
        for (int v = 0; v < NV; ++v) {
          const V bv = vload(b + v * L);
          x0[v] += s0 * bv;
          x1[v] += s1 * bv;
          x2[v] += s2 * bv;
          x3[v] += s3 * bv;
        }
      }
      for (int v = 0; v < NV; ++v) {
        vstore(c0 + j0 + v * L, x0[v]);
        vstore(c0 + ldc + j0 + v * L, x1[v]);
        vstore(c0 + 2 * ldc + j0 + v * L, x2[v]);
        vstore(c0 + 3 * ldc + j0 + v * L, x3[v]);
      }
    }
  }
  for (; r < R; ++r) {
    const T* a0 = A + r * lda;
    T* c0 = C + r * ldc;
    for (int64_t j0 = 0; j0 < ncols; j0 += kJW) {
      V x0[NV];
      for (int v = 0; v < NV; ++v) x0[v] = accumulate ? vload(c0 + j0 + v * L) : V{};
      for (int64_t k = 0; k < K; ++k) {
        const T* b = B + k * ldb + j0;
        const T s0 = a0[k];
        for (int v = 0; v < NV; ++v) x0[v] += s0 * vload(b + v * L);
      }
      for (int v = 0; v < NV; ++v) vstore(c0 + j0 + v * L, x0[v]);
    }
  }
}

// C[j][e] += sum_{r < R} A[r][j] * B[r][e] for j < n, e < ncols (a multiple of kJW): the rank-R
// update of dK / dV rows by a group of query rows (each C row read and written once per group).
template <typename T>
inline void gemm_tn_acc(T* __restrict C, int64_t ldc, const T* __restrict A, int64_t lda, int64_t R, int64_t n,
                        const T* __restrict B, int64_t ldb, int64_t ncols) {
  using V = vec_t<T>;
  constexpr int L = static_cast<int>(kVecBytes / sizeof(T));
  constexpr int NV = static_cast<int>(kJW) / L;
  for (int64_t j = 0; j < n; ++j) {
    T* c = C + j * ldc;
    for (int64_t e0 = 0; e0 < ncols; e0 += kJW) {
      V x[NV];
      for (int v = 0; v < NV; ++v) x[v] = vload(c + e0 + v * L);
      for (int64_t r = 0; r < R; ++r) {
        const T a = A[r * lda + j];
        const T* b = B + r * ldb + e0;
        for (int v = 0; v < NV; ++v) x[v] += a * vload(b + v * L);
      }
      for (int v = 0; v < NV; ++v) vstore(c + e0 + v * L, x[v]);
    }
  }
}

// Packs rows [j0, j0 + n) of a (b, head) slice of a (B, Hx, N, D) tensor, converted to T:
// transposed (out[d * ld + j]) or not (out[j * D + d]).
// ld is the leading dimension of `out` (>= n when transposed, >= D otherwise); the padding
// columns up to `pad` (transposed: keys n..pad, else dims D..pad) are zeroed.
template <typename T>
inline void pack_block(T* out, const Strided& t, int64_t b, int64_t head, int64_t j0, int64_t n, int64_t D,
                       bool transpose, int64_t ld, T* tmp, int64_t pad = 0) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t off = off4(t, b, head, j0 + j, 0);
    if (transpose) {
      load_row(tmp, t, off, t.s[3], D);
      for (int64_t d = 0; d < D; ++d) out[d * ld + j] = tmp[d];
    } else {
      load_row(out + j * ld, t, off, t.s[3], D);
      for (int64_t d = D; d < pad; ++d) out[j * ld + d] = T(0);
    }
  }
  if (transpose)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = n; j < pad; ++j) out[d * ld + j] = T(0);
}

// Number of row chunks and tasks: enough tasks to keep every thread busy, chunks of at least
// `min_rows` rows.
inline int64_t chunks_for(int64_t rows, int64_t outer, int64_t min_rows, int64_t max_chunks) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (4 * threads + outer - 1) / outer;
  const int64_t by_rows = std::max<int64_t>(1, rows / std::max<int64_t>(1, min_rows));
  return std::max<int64_t>(1, std::min({want, by_rows, max_chunks}));
}

}  // namespace cpu
}  // namespace lfi
