// Per-element / per-row math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// Conventions (identical to the Triton kernels in kernels/*.py and to the torch reference):
//  * scores stay in natural units, s = scale * q.k + mask (a float mask of finfo.min would
//    overflow if scaled by log2 e); exponentials are taken of differences to a row shift, e.g.
//    exp(s - m), computed as exp2((s - m) * log2 e);
//  * a running row max m of -inf (nothing attended yet) is replaced by 0 when it is used as a
//    shift ("shift_of"), so exp(-inf - shift) = 0 and no NaN ever appears;
//  * attention keeps its row statistics apart: (m, log l) with l = sum exp(s - m), (0, +inf) on
//    rows without an attended key, so P = exp((s - m) - log l) is exact even for huge scores and
//    exactly 0 on such rows; the KL ops keep theirs apart in the same way (see kl_finish);
//  * the KL state (x, y, c) is kept relative to the current shifts (see KLSums).
//
// Everything here is header-only, branch-free where it matters (selects, so that the CPU loops
// auto-vectorise) and __host__ __device__ under nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LFI_HD __host__ __device__ __forceinline__
#else
#define LFI_HD inline
#endif

namespace lfi {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename T>
LFI_HD T pos_inf() { return static_cast<T>(INFINITY); }
template <typename T>
LFI_HD T neg_inf() { return static_cast<T>(-INFINITY); }

// ---------------------------------------------------------------------------------------------
// Base-2 exponential / logarithm.
// On the host, float exp2 is a branch-free polynomial (Cephes exp2f, |rel err| < 2e-7 on the
// reduced range) written with plain float/int arithmetic so that loops calling it vectorise
// (libm's exp2f does not). Inputs below -126 (including -inf) give exactly 0.
// ---------------------------------------------------------------------------------------------
// The bits of a value as another type of the same size (std::bit_cast is C++20; the extension
// builds as C++17). memcpy is the defined way to do it in C++ and in CUDA device code, and
// compiles to a plain register move.
template <typename To, typename From>
LFI_HD To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs two types of one size");
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

LFI_HD float fast_exp2(float x) {
  const float xc = x < -126.0f ? -126.0f : (x > 127.0f ? 127.0f : x);
  // Round to nearest integer with the 1.5 * 2^23 trick: t's low mantissa bits hold n.
  const float magic = 12582912.0f;
  const float t = xc + magic;
  const float n = t - magic;
  const float f = xc - n;  // in [-0.5, 0.5]
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  // 2^n: (bits(t) + 127) << 23; the magic's own bits shift out of the word.
  const int32_t e = static_cast<int32_t>(static_cast<uint32_t>(bit_cast<int32_t>(t) + 127) << 23);
  const float r = p * bit_cast<float>(e);
  return x < -126.0f ? 0.0f : r;
}

LFI_HD float exp2_(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return fast_exp2(x);
#endif
}
LFI_HD double exp2_(double x) { return exp2(x); }

// Natural exponential: on the device the accurate expf; on the host exp2 of x * log2 e with the
// vectorisable polynomial above (x <= 0 here: relative error ~ 1e-7 * (1 + |x|)).
LFI_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return fast_exp2(x * 1.4426950408889634f);
#endif
}
LFI_HD double exp_(double x) { return exp(x); }
LFI_HD float log_(float x) { return logf(x); }
LFI_HD double log_(double x) { return log(x); }

// ---------------------------------------------------------------------------------------------
// Online softmax (flash style).
// ---------------------------------------------------------------------------------------------
// The shift used for a running max: 0 while nothing is attended (m = -inf).
template <typename T>
LFI_HD T shift_of(T m) { return m == neg_inf<T>() ? T(0) : m; }

// Starts a new tile whose largest score is tile_max: updates the running max m, returns the
// factor alpha by which sums and accumulators taken relative to the old shift must be
// multiplied, and rescales l. Afterwards add exp(s - shift_of(m)) of the tile's scores to l.
template <typename T>
LFI_HD T softmax_rescale(T& m, T& l, T tile_max) {
  const T m_new = m > tile_max ? m : tile_max;
  const T alpha = exp_(m - shift_of(m_new));  // m = -inf gives 0 (and l, acc are 0 then)
  m = m_new;
  l *= alpha;
  return alpha;
}

// log l of a finished row, +inf when nothing was attended (l == 0): with the shift m, the row's
// statistics (shift_of(m), log l) give P = exp((s - m) - log l). A NaN l (NaN or +inf among the
// row's scores) stays NaN, so the whole row of P, out and the gradients is NaN, as in eager softmax
// (README "Numerics"): the test is l == 0, never l > 0, which would turn NaN into an empty row.
template <typename T>
LFI_HD T log_l_of(T l) { return l == T(0) ? pos_inf<T>() : log_(l); }

// Whether a finished row attended no key (its l == 0 / log l == +inf): such rows are zeros in out,
// the maps and the gradients. False for NaN rows, which propagate.
template <typename T>
LFI_HD bool empty_row(T log_l) { return log_l == pos_inf<T>(); }

// Attention rows, with `maskable` = an attn_mask is given (only a mask can empty a row: top-left
// causal rows always attend key 0). Without one, l == 0 means that every score is -inf because of
// infinite q or k, and the row is NaN as in eager softmax: log l = -inf makes P = exp(-inf + inf)
// NaN, and out = 0 / 0. With a mask such a row is empty: (0, +inf) statistics, zeros.
template <typename T>
LFI_HD T log_l_of(T l, bool maskable) { return (l == T(0) && maskable) ? pos_inf<T>() : log_(l); }

// out = acc / l of a finished attention row: exactly 0 on rows without an attended key (even where
// acc holds 0 * NaN from a NaN in V at a key the row does not attend), NaN where l is NaN.
template <typename T>
LFI_HD T out_of(T acc, T l, bool maskable) { return (l == T(0) && maskable) ? T(0) : acc / l; }

// Probability from the row statistics (m, log l); the subtraction order keeps huge scores exact.
template <typename T>
LFI_HD T prob_of(T s, T m, T log_l) { return exp_((s - m) - log_l); }

// ---------------------------------------------------------------------------------------------
// KL(t || softmax(s)) per row, online over key tiles, in one pass.
//
// The student's (m, l) are the online softmax above. The target is either
//  * probabilities (weights t >= 0, normalised by Z = sum t over the kept keys):
//      x = Z, y = sum t ln t, c = sum t (s - sh),
//  * logits u = tg * target_scale (target probabilities softmax(u)):
//      x = sum exp(u - shu), y = mu (running max of u), c = sum e ((u - shu) - (s - sh)),
// with sh = shift_of(m), shu = shift_of(mu). Then KL = y/x - ln x - c/x + ln l (probabilities)
// or c/x - ln x + ln l (logits). Per tile: kl_rescale to the new shifts, then kl_add each element
// (partial sums may be accumulated independently, e.g. per SIMD lane or CUDA lane, and summed
// with kl_merge before being added to the row state). The fused attention KL is the
// probabilities case with keep = (s > -inf).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct KLSums {
  T x, y, c;
};

template <typename T>
LFI_HD KLSums<T> kl_init(bool logits) {
  return KLSums<T>{T(0), logits ? neg_inf<T>() : T(0), T(0)};
}

// Partial sums start at zero in both modes (y is a sum for probabilities, unused for logits).
template <typename T>
LFI_HD KLSums<T> kl_zero() { return KLSums<T>{T(0), T(0), T(0)}; }

// Moves the row state from the student shift sh_old to sh_new and, for logit targets, from the
// running max st.y to mu_new (>= st.y).
template <typename T>
LFI_HD void kl_rescale(KLSums<T>& st, T sh_old, T sh_new, T mu_new, bool logits) {
  if (logits) {
    const T shu_old = shift_of(st.y);
    const T shu = shift_of(mu_new);
    const T beta = exp_(st.y - shu);
    st.c = beta * (st.c + st.x * ((shu_old - shu) - (sh_old - sh_new)));
    st.x *= beta;
    st.y = mu_new;
  } else {
    st.c += st.x * (sh_old - sh_new);
  }
}

// Logit target's score (-inf where the key is not kept).
template <typename T>
LFI_HD T kl_u(T tg, bool keep, T t_scale) { return keep ? tg * t_scale : neg_inf<T>(); }

// One element's contribution. s: student's score (-inf where not kept); tg: the raw target
// value; sh, shu: the current shifts (shu unused for probabilities).
template <typename T>
LFI_HD void kl_add(KLSums<T>& acc, T s, T tg, bool keep, T sh, T shu, T t_scale, bool logits) {
  if (logits) {
    const T u = kl_u(tg, keep, t_scale) - shu;
    const T e = exp_(u);
    acc.x += e;
    acc.c += e > T(0) ? e * (u - (s - sh)) : T(0);
  } else {
    const T t = keep ? tg : T(0);
    // `!= 0`, not `> 0`: a negative probability (not checked on a GPU: it would synchronise, see
    // lfi/ops/_kl.py) makes the row's KL NaN through its log, as F.kl_div, never a wrong number.
    const bool nonzero = t != T(0);
    acc.y += nonzero ? t * log_(nonzero ? t : T(1)) : T(0);
    acc.c += nonzero ? t * (s - sh) : T(0);
    acc.x += t;
  }
}

template <typename T>
LFI_HD void kl_merge(KLSums<T>& st, const KLSums<T>& part, bool logits) {
  st.x += part.x;
  st.c += part.c;
  if (!logits) st.y += part.y;
}

// (kl, t_shift, t_log_z) from the row state and the student's log l (+inf when nothing is kept).
// The target's normaliser is kept as a pair, like the student's (m, log l): logits give
// t = exp((u - t_shift) - t_log_z) with t_shift = the row max of u, t_log_z = log sum exp(u -
// t_shift) (+inf without a kept key); probabilities give t_shift = 0, t_log_z = log Z (-inf without
// target mass). KL is 0 on rows without a kept key or without target mass; +inf on rows whose
// target puts mass on kept keys that the student gives -inf (as F.kl_div); NaN where the student's
// or the target's row holds NaN / +inf (the tests are == / !=, so a NaN sum or log l propagates).
template <typename T>
LFI_HD void kl_finish(const KLSums<T>& st, T log_l, bool logits, T& kl, T& t_shift, T& t_log_z) {
  const bool has_s = log_l != pos_inf<T>();
  const bool has_t = st.x != T(0);
  const T x = has_t ? st.x : T(1);
  const T ll = has_s ? log_l : T(0);
  const T log_x = log_(x);
  T k;
  if (logits) {
    t_shift = shift_of(st.y);
    t_log_z = has_t ? log_x : pos_inf<T>();
    k = st.c / x - log_x + ll;
  } else {
    t_shift = T(0);
    // Z = +inf (a +inf weight): t = target / Z is NaN there, so the row's log Z is NaN too, which
    // makes its KL and every kept key's gradient NaN (as F.kl_div on the normalised target).
    t_log_z = has_t ? (x == pos_inf<T>() ? x - x : log_x) : neg_inf<T>();
    k = st.y / x - log_x - st.c / x + ll;
  }
  kl = has_t ? (has_s ? k : pos_inf<T>()) : T(0);
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------
// Attention: dS = P * (dP - delta), dP = dO V^T + G, delta = rowsum(dO * O) + rowsum(P * G).
template <typename T>
LFI_HD T attn_dscore(T p, T dp, T delta) { return p * (dp - delta); }

// Per-row factors for the KL gradient g * (p - t): for probabilities t = t_raw * inv_z, and the
// gradient is 0 on rows without target mass (t_log_z = -inf); for logits
// t = exp((u - t_shift) - t_log_z). (t_shift, t_log_z) as stored by kl_finish.
template <typename T>
struct KLGradRow {
  T g;        // incoming gradient (0 on rows without mass)
  T inv_z;    // probabilities: 1 / Z
  T t_shift;  // logits: row max of the target logits
  T t_log_z;  // logits: log sum exp(u - t_shift)
};

template <typename T>
LFI_HD KLGradRow<T> kl_grad_row(T g, T t_shift, T t_log_z, bool logits) {
  KLGradRow<T> r;
  if (logits) {
    r.g = g;
    r.inv_z = T(0);
    r.t_shift = t_shift;
    r.t_log_z = t_log_z;
  } else {
    const bool no_mass = t_log_z == neg_inf<T>();
    r.g = no_mass ? T(0) : g;
    r.inv_z = no_mass ? T(0) : exp_(-t_log_z);
    r.t_shift = T(0);
    r.t_log_z = T(0);
  }
  return r;
}

// d KL / d s of one element: g * (p - t), 0 where the key is not kept.
template <typename T>
LFI_HD T kl_dscore(T p, T tg, bool keep, const KLGradRow<T>& row, T t_scale, bool logits) {
  const T t = logits ? exp_((kl_u(tg, keep, t_scale) - row.t_shift) - row.t_log_z) : (keep ? tg : T(0)) * row.inv_z;
  return keep ? row.g * (p - t) : T(0);
}

// ---------------------------------------------------------------------------------------------
// Appended for the tensor-core kernels (csrc/cuda/attention_tc.cu).
// ---------------------------------------------------------------------------------------------
// exp(s - sh) = exp2(softmax_exp2_arg(s, sh * log2 e)): the row's sh * log2 e is formed once per
// tile, so each score costs one FMA and one base-2 exponential. s = -inf gives -inf (exp2: 0).
LFI_HD float softmax_exp2_arg(float s, float sh_log2e) { return fmaf(s, static_cast<float>(kLog2e), -sh_log2e); }
// The same from an unscaled score x (s = scale * x, scale > 0) and scale_log2e = scale * log2 e.
LFI_HD float softmax_exp2_arg_scaled(float x, float scale_log2e, float sh_log2e) {
  return fmaf(x, scale_log2e, -sh_log2e);
}

}  // namespace lfi
