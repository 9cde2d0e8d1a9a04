// Host side of the lfi_C ops: checks the tensors, allocates the outputs, fills the parameter
// structs of lfi_params.h and runs the CPU or the CUDA kernels (one code path for both devices).
#include "ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "lfi_kernels.h"

#if defined(LFI_WITH_CUDA) && !defined(LFI_CUDA_EMULATE)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lfi {
namespace {

using at::Tensor;

int32_t dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBool: return kBool;
    default: TORCH_CHECK(false, "lfi_C: unsupported dtype ", t.scalar_type());
  }
  return kF32;
}

// A strided view of t read as `shape` (broadcast dims get stride 0). Bool tensors are read as
// bytes.
Strided view(const Tensor& t, at::IntArrayRef shape) {
  Strided s;
  const Tensor e = t.expand(shape);
  s.ptr = const_cast<void*>(t.data_ptr());
  for (int64_t d = 0; d < e.dim(); ++d) s.s[d] = e.stride(d);
  s.dtype = dtype_code(t);
  return s;
}

Strided view(const Tensor& t) { return view(t, t.sizes()); }

bool is_float(const Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble;
}

void check_compute_dtype(const Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat,
                     "backend='cuda' on CUDA tensors supports float16, bfloat16 and float32, got ", name, ".dtype=", st,
                     "; use backend='torch' for float64");
  } else {
    TORCH_CHECK_TYPE(is_float(t), "backend='cuda' supports floating-point inputs, got ", name, ".dtype=", st);
  }
}

void check_device(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "lfi_C: ", name, " is on ", t.device(), " but q is on ", ref.device());
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), "lfi_C: unsupported device ", t.device());
}

void check_broadcast(const Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.dim() == 4, "lfi_C: ", name, " must be 4-D, got ", t.sizes());
  for (int64_t d = 0; d < 4; ++d)
    TORCH_CHECK(t.size(d) == 1 || t.size(d) == shape[d], "lfi_C: ", name, " of shape ", t.sizes(),
                " does not broadcast to ", shape);
}

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Row statistics as contiguous tensors of the accumulation type.
Tensor contiguous_stats(const Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// Inputs that are not read in their own dtype by the kernels (e.g. integer targets) become float.
Tensor as_float(const Tensor& t) { return is_float(t) ? t : t.to(at::kFloat); }

#ifdef LFI_WITH_CUDA
void check_cuda(const char* err) { TORCH_CHECK(err == nullptr, "lfi_C CUDA kernel failed: ", err ? err : ""); }
#endif

template <typename CpuFn, typename CudaFn>
void run(const Tensor& ref, CpuFn cpu_fn, CudaFn cuda_fn) {
#ifdef LFI_CUDA_EMULATE
  // Emulator build: the CUDA kernels run on CPU tensors (see csrc/emu/cuda_emu.h).
  TORCH_CHECK(ref.is_cpu(), "the lfi_C CUDA emulator takes CPU tensors");
  TORCH_CHECK(ref.scalar_type() != at::kDouble, "the lfi_C CUDA emulator takes float16/bfloat16/float32");
  (void)cpu_fn;
  check_cuda(cuda_fn(nullptr));
  return;
#endif
  if (ref.is_cuda()) {
#if defined(LFI_WITH_CUDA) && !defined(LFI_CUDA_EMULATE)
    c10::cuda::CUDAGuard guard(ref.device());
    check_cuda(cuda_fn(c10::cuda::getCurrentCUDAStream(ref.get_device()).stream()));
#else
    (void)cuda_fn;
    TORCH_CHECK(false, "lfi_C was built without CUDA support (CPU-only build): cannot run on ", ref.device());
#endif
  } else {
    cpu_fn(ref.scalar_type() == at::kDouble);
  }
}

// run() with one op's kernels: lfi::cpu::<op> for CPU tensors, lfi::cuda::<op> for CUDA tensors
// (not compiled into a CPU-only build, whose run() refuses CUDA tensors before calling it).
#ifdef LFI_WITH_CUDA
#define LFI_RUN(ref, op, params) \
  run(ref, [&](bool dbl) { cpu::op(params, dbl); }, [&](void* stream) { return cuda::op(params, stream); })
#else
#define LFI_RUN(ref, op, params) \
  run(ref, [&](bool dbl) { cpu::op(params, dbl); }, [](void*) -> const char* { return nullptr; })
#endif

void check_qk(const Tensor& q, const Tensor& k) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "lfi_C: q and k must be 4-D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "lfi_C: k ", k.sizes(), " does not match q ",
              q.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "lfi_C: q has ", q.size(1), " heads and k ", k.size(1),
              ": needs H % Hkv == 0");
  TORCH_CHECK(q.size(3) <= 256, "backend='cuda' supports head dims up to 256, got ", q.size(3));
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "lfi_C: q and k dtypes differ");
  check_compute_dtype(q, "q");
  check_device(k, q, "k");
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& mask, double scale,
    bool is_causal, int64_t w_start, int64_t w_stop, const c10::optional<Tensor>& kl_target) {
  check_qk(q, k);
  TORCH_CHECK(v.dim() == 4 && v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "lfi_C: v ", v.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(v.size(3) <= 256, "backend='cuda' supports head dims up to 256, got Dv=", v.size(3));
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "lfi_C: q and v dtypes differ");
  check_device(v, q, "v");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), N = k.size(2), Dv = v.size(3);
  TORCH_CHECK(0 <= w_start && w_start <= w_stop && w_stop <= M, "lfi_C: bad weights rows [", w_start, ", ", w_stop,
              ") for M=", M);
  const std::vector<int64_t> shape{B, H, M, N};
  const auto acc = acc_type(q);
  auto opts = q.options();
  Tensor out = at::empty({B, H, M, Dv}, opts);
  Tensor stats = at::empty({B, H, M, 2}, opts.dtype(acc));  // (row max m, log l)
  Tensor weights = at::empty({B, H, w_stop - w_start, N}, opts);
  const bool has_kl = kl_target.has_value() && kl_target->defined();
  Tensor kl = has_kl ? at::empty({B, H, M}, opts.dtype(acc)) : at::empty({0}, opts.dtype(acc));
  Tensor tnorm = has_kl ? at::empty({B, H, M}, opts.dtype(acc)) : at::empty({0}, opts.dtype(acc));
  if (out.numel() == 0 && stats.numel() == 0) return {out, stats, weights, kl, tnorm};

  AttnParams p;
  p.B = B; p.H = H; p.Hkv = k.size(1); p.M = M; p.N = N; p.D = q.size(3); p.Dv = Dv;
  p.scale = scale; p.causal = is_causal; p.w_start = w_start; p.w_stop = w_stop;
  p.q = view(q); p.k = view(k); p.v = view(v);
  Tensor mask_t, target_t;
  if (mask.has_value() && mask->defined()) {
    mask_t = *mask;
    check_device(mask_t, q, "attn_mask");
    check_broadcast(mask_t, shape, "attn_mask");
    TORCH_CHECK(mask_t.scalar_type() == at::kBool || is_float(mask_t), "lfi_C: attn_mask must be bool or float");
    p.mask = view(mask_t, shape);
    p.mask_bool = mask_t.scalar_type() == at::kBool;
  }
  if (has_kl) {
    target_t = as_float(*kl_target);
    check_device(target_t, q, "kl_target");
    check_broadcast(target_t, shape, "kl_target");
    p.kl_target = view(target_t, shape);
  }
  p.out = view(out);
  p.weights = weights.numel() ? view(weights) : Strided{};
  p.stats = stats.data_ptr();
  p.kl = has_kl ? kl.data_ptr() : nullptr;
  p.tnorm = has_kl ? tnorm.data_ptr() : nullptr;
  LFI_RUN(q, attention_forward, p);
  return {out, stats, weights, kl, tnorm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& grad_out, const c10::optional<Tensor>& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& stats, const c10::optional<Tensor>& mask, double scale,
    bool is_causal, int64_t w_start, int64_t w_stop, bool mask_grad, const c10::optional<Tensor>& kl_target,
    const c10::optional<Tensor>& tnorm, const c10::optional<Tensor>& grad_kl) {
  check_qk(q, k);
  TORCH_CHECK(stats.dim() == 4 && stats.size(3) == 2, "lfi_C: stats must be (B, H, M, 2), got ", stats.sizes());
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), N = k.size(2), D = q.size(3), Dv = v.size(3);
  const std::vector<int64_t> shape{B, H, M, N};
  const auto acc = acc_type(q);
  // Contiguous gradients whatever the inputs' strides (what the fake kernel promises).
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  const bool has_mask = mask.has_value() && mask->defined();
  const bool want_ds = mask_grad && has_mask;
  Tensor ds = want_ds ? at::zeros({B, H, M, N}, q.options().dtype(acc)) : Tensor();
  Tensor delta = at::empty({B, H, M}, q.options().dtype(acc));
  Tensor stats_c = contiguous_stats(stats, acc);
  Tensor go = grad_out.scalar_type() == q.scalar_type() ? grad_out : grad_out.to(q.scalar_type());
  check_device(go, q, "grad_out");

  AttnParams p;
  p.B = B; p.H = H; p.Hkv = k.size(1); p.M = M; p.N = N; p.D = D; p.Dv = Dv;
  p.scale = scale; p.causal = is_causal; p.w_start = w_start; p.w_stop = w_stop;
  p.q = view(q); p.k = view(k); p.v = view(v); p.out = view(out);
  p.grad_out = view(go, {B, H, M, Dv});
  Tensor mask_t, target_t, tnorm_c, gkl_t, gw_t;
  if (has_mask) {
    mask_t = *mask;
    check_broadcast(mask_t, shape, "attn_mask");
    p.mask = view(mask_t, shape);
    p.mask_bool = mask_t.scalar_type() == at::kBool;
  }
  if (grad_weights.has_value() && grad_weights->defined() && grad_weights->numel() > 0) {
    gw_t = *grad_weights;
    check_device(gw_t, q, "grad_weights");
    p.grad_weights = view(gw_t, {B, H, w_stop - w_start, N});
  }
  if (grad_kl.has_value() && grad_kl->defined()) {
    TORCH_CHECK(kl_target.has_value() && kl_target->defined() && tnorm.has_value() && tnorm->defined(),
                "lfi_C: grad_kl needs kl_target and tnorm");
    target_t = as_float(*kl_target);
    check_broadcast(target_t, shape, "kl_target");
    p.kl_target = view(target_t, shape);
    tnorm_c = contiguous_stats(*tnorm, acc);
    p.tnorm = tnorm_c.data_ptr();
    gkl_t = as_float(*grad_kl);
    const Tensor e = gkl_t.expand({B, H, M});
    p.grad_kl.ptr = gkl_t.data_ptr();
    p.grad_kl.s[0] = e.stride(0); p.grad_kl.s[1] = e.stride(1); p.grad_kl.s[2] = e.stride(2);
    p.grad_kl.dtype = dtype_code(gkl_t);
  }
  p.stats = stats_c.data_ptr();
  p.delta = delta.data_ptr();
  p.dq = view(dq); p.dk = view(dk); p.dv = view(dv);
  p.ds = want_ds ? ds.data_ptr() : nullptr;
  LFI_RUN(q, attention_backward, p);
  Tensor dmask;
  if (want_ds) {
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < 4; ++d)
      if (mask_t.size(d) == 1 && shape[d] != 1) dims.push_back(d);
    dmask = (dims.empty() ? ds : ds.sum(dims, /*keepdim=*/true)).to(mask_t.scalar_type());
  } else {
    dmask = at::empty({0}, q.options());
  }
  return {dq, dk, dv, dmask};
}

namespace {

void fill_kl_common(KLParams& p, const c10::optional<Tensor>& target, const c10::optional<Tensor>& key_mask,
                    at::IntArrayRef shape, const Tensor& ref, Tensor& target_t, Tensor& mask_t) {
  if (target.has_value() && target->defined()) {
    target_t = as_float(*target);
    check_device(target_t, ref, "target");
    check_broadcast(target_t, shape, "target");
    p.target = view(target_t, shape);
  }
  if (key_mask.has_value() && key_mask->defined()) {
    mask_t = key_mask->scalar_type() == at::kBool ? *key_mask : key_mask->ne(0);
    check_device(mask_t, ref, "key_mask");
    check_broadcast(mask_t, shape, "key_mask");
    p.key_mask = view(mask_t, shape);
  }
}

// The backward's inputs: grad_kl (B, H, M) read with broadcast strides, the forward's row
// statistics contiguous in the accumulation dtype. Returns the tensors p points into (the caller
// keeps them alive for the kernel).
std::array<Tensor, 3> set_grad_inputs(KLParams& p, const Tensor& grad_kl, const Tensor& stats, const Tensor& tstats,
                                      at::ScalarType acc) {
  std::array<Tensor, 3> held{as_float(grad_kl), contiguous_stats(stats, acc), contiguous_stats(tstats, acc)};
  const Tensor e = held[0].expand({p.B, p.H, p.M});
  p.grad_kl.ptr = const_cast<void*>(held[0].data_ptr());
  p.grad_kl.s[0] = e.stride(0); p.grad_kl.s[1] = e.stride(1); p.grad_kl.s[2] = e.stride(2);
  p.grad_kl.dtype = dtype_code(held[0]);
  p.stats = held[1].data_ptr(); p.tstats = held[2].data_ptr();
  return held;
}

// The forward's outputs kl (B, H, M), stats, tstats (B, H, M, 2) in the accumulation dtype of
// ref, with p pointing at them.
std::tuple<Tensor, Tensor, Tensor> kl_outputs(KLParams& p, const Tensor& ref) {
  auto opts = ref.options().dtype(acc_type(ref));
  Tensor kl = at::empty({p.B, p.H, p.M}, opts), stats = at::empty({p.B, p.H, p.M, 2}, opts),
         tstats = at::empty({p.B, p.H, p.M, 2}, opts);
  p.kl = kl.data_ptr(); p.stats = stats.data_ptr(); p.tstats = tstats.data_ptr();
  return {kl, stats, tstats};
}

// attention_kl's parameters: logits (B, H, M, N), the target and key mask read as broadcast to it
// (target_t, mask_t hold converted copies for the call).
KLParams dense_params(const Tensor& logits, const Tensor& target, const c10::optional<Tensor>& key_mask,
                      double student_scale, double target_scale, bool target_is_logits, Tensor& target_t,
                      Tensor& mask_t) {
  TORCH_CHECK(logits.dim() == 4, "lfi_C: logits must be 4-D, got ", logits.sizes());
  check_compute_dtype(logits, "logits");
  KLParams p;
  p.B = logits.size(0); p.H = logits.size(1); p.M = logits.size(2); p.N = logits.size(3);
  p.student_scale = student_scale; p.target_scale = target_scale; p.target_is_logits = target_is_logits;
  p.logits = view(logits);
  fill_kl_common(p, target, key_mask, logits.sizes(), logits, target_t, mask_t);
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> kl_fwd(const Tensor& logits, const Tensor& target,
                                          const c10::optional<Tensor>& key_mask, double student_scale,
                                          double target_scale, bool target_is_logits) {
  Tensor target_t, mask_t;
  KLParams p = dense_params(logits, target, key_mask, student_scale, target_scale, target_is_logits, target_t, mask_t);
  auto out = kl_outputs(p, logits);
  if (std::get<0>(out).numel() == 0 || p.N == 0) return out;
  LFI_RUN(logits, kl_forward, p);
  return out;
}

Tensor kl_bwd(const Tensor& grad_kl, const Tensor& logits, const Tensor& target,
              const c10::optional<Tensor>& key_mask, const Tensor& stats, const Tensor& tstats, double student_scale,
              double target_scale, bool target_is_logits) {
  Tensor target_t, mask_t;
  KLParams p = dense_params(logits, target, key_mask, student_scale, target_scale, target_is_logits, target_t, mask_t);
  Tensor dlogits = at::empty(logits.sizes(), logits.options());
  if (dlogits.numel() == 0) return dlogits;
  const auto held = set_grad_inputs(p, grad_kl, stats, tstats, acc_type(logits));
  p.dlogits = view(dlogits);
  LFI_RUN(logits, kl_backward, p);
  return dlogits;
}

namespace {

KLParams qk_params(const Tensor& q, const Tensor& k, const c10::optional<Tensor>& target,
                   const c10::optional<Tensor>& q_t, const c10::optional<Tensor>& k_t,
                   const c10::optional<Tensor>& key_mask, double student_scale, double target_scale,
                   bool target_is_logits, Tensor& target_t, Tensor& mask_t, Tensor& qt_t, Tensor& kt_t) {
  check_qk(q, k);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), N = k.size(2);
  KLParams p;
  p.B = B; p.H = H; p.M = M; p.N = N; p.Hkv = k.size(1); p.D = q.size(3);
  p.student_scale = student_scale; p.target_scale = target_scale; p.target_is_logits = target_is_logits;
  p.q = view(q); p.k = view(k);
  const std::vector<int64_t> shape{B, H, M, N};
  const bool dense = target.has_value() && target->defined();
  fill_kl_common(p, target, key_mask, shape, q, target_t, mask_t);
  if (!dense) {
    TORCH_CHECK(q_t.has_value() && q_t->defined() && k_t.has_value() && k_t->defined(),
                "lfi_C: an implicit teacher needs both q_t and k_t");
    qt_t = *q_t;
    kt_t = *k_t;
    TORCH_CHECK(qt_t.dim() == 4 && kt_t.dim() == 4, "lfi_C: q_t and k_t must be 4-D");
    const int64_t Ht = qt_t.size(1), Htk = kt_t.size(1), Dt = qt_t.size(3);
    TORCH_CHECK(qt_t.size(0) == B && (Ht == 1 || Ht == H) && qt_t.size(2) == M && kt_t.size(0) == B &&
                    kt_t.size(2) == N && kt_t.size(3) == Dt && Htk >= 1 && Ht % Htk == 0,
                "lfi_C: teacher q_t ", qt_t.sizes(), ", k_t ", kt_t.sizes(), " do not match q ", q.sizes(), ", k ",
                k.sizes(), " (need Ht in (1, H), Ht % Htk == 0)");
    TORCH_CHECK(Dt <= 256, "backend='cuda' supports teacher head dims up to 256, got ", Dt);
    TORCH_CHECK(is_float(qt_t) && is_float(kt_t), "lfi_C: q_t and k_t must be floating point");
    check_device(qt_t, q, "q_t");
    check_device(kt_t, q, "k_t");
    if (q.is_cuda()) {  // the CUDA kernels read float16 / bfloat16 / float32
      if (qt_t.scalar_type() == at::kDouble) qt_t = qt_t.to(at::kFloat);
      if (kt_t.scalar_type() == at::kDouble) kt_t = kt_t.to(at::kFloat);
    }
    p.implicit = true;
    p.Ht = Ht; p.Htk = Htk; p.Dt = Dt;
    p.q_t = view(qt_t); p.k_t = view(kt_t);
  }
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> kl_qk_fwd(const Tensor& q, const Tensor& k, const c10::optional<Tensor>& target,
                                             const c10::optional<Tensor>& q_t, const c10::optional<Tensor>& k_t,
                                             const c10::optional<Tensor>& key_mask, double student_scale,
                                             double target_scale, bool target_is_logits) {
  Tensor target_t, mask_t, qt_t, kt_t;
  KLParams p = qk_params(q, k, target, q_t, k_t, key_mask, student_scale, target_scale, target_is_logits, target_t,
                         mask_t, qt_t, kt_t);
  auto out = kl_outputs(p, q);
  if (std::get<0>(out).numel() == 0 || p.N == 0) return out;
  LFI_RUN(q, kl_qk_forward, p);
  return out;
}

std::tuple<Tensor, Tensor> kl_qk_bwd(const Tensor& grad_kl, const Tensor& q, const Tensor& k,
                                     const c10::optional<Tensor>& target, const c10::optional<Tensor>& q_t,
                                     const c10::optional<Tensor>& k_t, const c10::optional<Tensor>& key_mask,
                                     const Tensor& stats, const Tensor& tstats, double student_scale,
                                     double target_scale, bool target_is_logits) {
  Tensor target_t, mask_t, qt_t, kt_t;
  KLParams p = qk_params(q, k, target, q_t, k_t, key_mask, student_scale, target_scale, target_is_logits, target_t,
                         mask_t, qt_t, kt_t);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  if (dq.numel() == 0 || p.N == 0) return {dq.zero_(), dk.zero_()};
  const auto held = set_grad_inputs(p, grad_kl, stats, tstats, acc_type(q));
  p.dq = view(dq); p.dk = view(dk);
  LFI_RUN(q, kl_qk_backward, p);
  return {dq, dk};
}

std::string build_info() {
  std::string s = "version=1";
#ifdef LFI_CUDA_EMULATE
  s += ";emulated=1";
#endif
#ifdef LFI_WITH_CUDA
  s += ";cuda=1;archs=";
  s += cuda::compiled_archs();
#else
  s += ";cuda=0";
#endif
  return s;
}

}  // namespace lfi
