"""backend="cuda" for attention_kl: the lfi_C extension's row kernels on dense student logits.

Same contract as lfi.backends.torch.attention_kl: logits (B, H, M, N), any strides; target and
key_mask 4-D, broadcastable to it (stride 0 along broadcast dims, never expanded in memory).
float16 / bfloat16 / float32 on CUDA; on CPU also float64.
"""
from __future__ import annotations

from lfi.backends.cuda import _ext


def kl_forward(logits, target, key_mask, student_scale: float, target_scale: float, target_is_logits: bool):
    """Returns kl (B, H, M), stats, tstats (B, H, M, 2): float32 (float64 for float64 logits)."""
    return tuple(_ext.ops().kl_fwd(logits, target, key_mask, float(student_scale), float(target_scale),
                                   bool(target_is_logits)))


def kl_backward(grad_kl, logits, target, key_mask, stats, tstats, student_scale: float, target_scale: float,
                target_is_logits: bool):
    """Returns dlogits (B, H, M, N) in logits.dtype, contiguous."""
    return _ext.ops().kl_bwd(grad_kl, logits, target, key_mask, stats, tstats, float(student_scale),
                             float(target_scale), bool(target_is_logits))
