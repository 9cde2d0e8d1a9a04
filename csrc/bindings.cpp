// Operator schemas of the extension (namespace lfi_C) and their CPU / CUDA registrations.
// The library is loaded with torch.ops.load_library (no pybind11 module): lfi/backends/cuda/_ext.py.
// Built without CUDA (no LFI_WITH_CUDA), only the CPU kernels are registered.
#include <torch/library.h>

#include "ops.h"

// The emulator build (csrc/emu) registers the same ops under another namespace, so that both
// libraries can be loaded in one process.
#ifdef LFI_CUDA_EMULATE
#define LFI_OPS_NS lfi_C_emu
#else
#define LFI_OPS_NS lfi_C
#endif
#define LFI_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LFI_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

LFI_TORCH_LIBRARY(LFI_OPS_NS, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal, int w_start, "
      "int w_stop, Tensor? kl_target) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_weights, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, "
      "Tensor? mask, float scale, bool is_causal, int w_start, int w_stop, bool mask_grad, Tensor? kl_target, "
      "Tensor? tnorm, Tensor? grad_kl) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "kl_fwd(Tensor logits, Tensor target, Tensor? key_mask, float student_scale, float target_scale, "
      "bool target_is_logits) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kl_bwd(Tensor grad_kl, Tensor logits, Tensor target, Tensor? key_mask, Tensor stats, Tensor tstats, "
      "float student_scale, float target_scale, bool target_is_logits) -> Tensor");
  m.def(
      "kl_qk_fwd(Tensor q, Tensor k, Tensor? target, Tensor? q_t, Tensor? k_t, Tensor? key_mask, "
      "float student_scale, float target_scale, bool target_is_logits) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kl_qk_bwd(Tensor grad_kl, Tensor q, Tensor k, Tensor? target, Tensor? q_t, Tensor? k_t, Tensor? key_mask, "
      "Tensor stats, Tensor tstats, float student_scale, float target_scale, bool target_is_logits) "
      "-> (Tensor, Tensor)");
  m.def("build_info() -> str", &lfi::build_info);
}

#define LFI_REGISTER_IMPLS(m)                    \
  m.impl("attention_fwd", &lfi::attention_fwd); \
  m.impl("attention_bwd", &lfi::attention_bwd); \
  m.impl("kl_fwd", &lfi::kl_fwd);               \
  m.impl("kl_bwd", &lfi::kl_bwd);               \
  m.impl("kl_qk_fwd", &lfi::kl_qk_fwd);         \
  m.impl("kl_qk_bwd", &lfi::kl_qk_bwd);

LFI_TORCH_LIBRARY_IMPL(LFI_OPS_NS, CPU, m) { LFI_REGISTER_IMPLS(m) }

#if defined(LFI_WITH_CUDA) && !defined(LFI_CUDA_EMULATE)
LFI_TORCH_LIBRARY_IMPL(LFI_OPS_NS, CUDA, m) { LFI_REGISTER_IMPLS(m) }
#endif
