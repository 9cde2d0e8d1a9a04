// The lfi_C operators (registered in bindings.cpp for the CPU and CUDA dispatch keys).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace lfi {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& mask, double scale,
    bool is_causal, int64_t w_start, int64_t w_stop, const c10::optional<Tensor>& kl_target);

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& grad_out, const c10::optional<Tensor>& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& stats, const c10::optional<Tensor>& mask, double scale,
    bool is_causal, int64_t w_start, int64_t w_stop, bool mask_grad, const c10::optional<Tensor>& kl_target,
    const c10::optional<Tensor>& tnorm, const c10::optional<Tensor>& grad_kl);

std::tuple<Tensor, Tensor, Tensor> kl_fwd(const Tensor& logits, const Tensor& target,
                                          const c10::optional<Tensor>& key_mask, double student_scale,
                                          double target_scale, bool target_is_logits);

Tensor kl_bwd(const Tensor& grad_kl, const Tensor& logits, const Tensor& target,
              const c10::optional<Tensor>& key_mask, const Tensor& stats, const Tensor& tstats, double student_scale,
              double target_scale, bool target_is_logits);

std::tuple<Tensor, Tensor, Tensor> kl_qk_fwd(const Tensor& q, const Tensor& k, const c10::optional<Tensor>& target,
                                             const c10::optional<Tensor>& q_t, const c10::optional<Tensor>& k_t,
                                             const c10::optional<Tensor>& key_mask, double student_scale,
                                             double target_scale, bool target_is_logits);

std::tuple<Tensor, Tensor> kl_qk_bwd(const Tensor& grad_kl, const Tensor& q, const Tensor& k,
                                     const c10::optional<Tensor>& target, const c10::optional<Tensor>& q_t,
                                     const c10::optional<Tensor>& k_t, const c10::optional<Tensor>& key_mask,
                                     const Tensor& stats, const Tensor& tstats, double student_scale,
                                     double target_scale, bool target_is_logits);

std::string build_info();

}  // namespace lfi
