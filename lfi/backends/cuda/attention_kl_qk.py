"""backend="cuda" for attention_kl_qk: student logits q k^T * scale (and an implicit teacher's
q_t k_t^T * scale_t) computed tile by tile in the lfi_C extension, never materialized.

Same contract as lfi.backends.torch.attention_kl_qk: q (B, H, M, D), k (B, Hkv, N, D),
H % Hkv == 0, any strides; a dense target broadcastable to (B, H, M, N), or q_t (B, Ht, M, Dt) with
Ht in {1, H} and k_t (B, Htk, N, Dt), Ht % Htk == 0. float16 / bfloat16 / float32 on CUDA; on CPU
also float64.
"""
from __future__ import annotations

from lfi.backends.cuda import _ext


def kl_qk_forward(q, k, target, q_t, k_t, key_mask, student_scale: float, target_scale: float,
                  target_is_logits: bool):
    """Returns kl (B, H, M), stats, tstats (B, H, M, 2): float32 (float64 for float64 inputs)."""
    return tuple(_ext.ops().kl_qk_fwd(q, k, target, q_t if target is None else None, k_t if target is None else None,
                                      key_mask, float(student_scale), float(target_scale),
                                      bool(target_is_logits or target is None)))


def kl_qk_backward(grad_kl, q, k, target, q_t, k_t, key_mask, stats, tstats, student_scale: float,
                   target_scale: float, target_is_logits: bool):
    """Returns (dq, dk) in q's and k's dtypes."""
    return tuple(_ext.ops().kl_qk_bwd(grad_kl, q, k, target, q_t if target is None else None,
                                      k_t if target is None else None, key_mask, stats, tstats, float(student_scale),
                                      float(target_scale), bool(target_is_logits or target is None)))
