"""backend="cuda" for interaction_attention: the lfi_C extension's attention kernels.

Same contract as lfi.backends.torch.interaction_attention (shapes, dtypes, row statistics
(m, log l) with (0, +inf) on rows without an attended key, zero rows, fused KL with tnorm): q (B, H, M, D),
k (B, Hkv, N, D), v (B, Hkv, N, Dv), any strides; mask (bool or float) and kl_target 4-D, broadcastable to
(B, H, M, N) and read with stride 0 along broadcast dims. float16 / bfloat16 / float32 on CUDA
(float32 accumulation); on CPU also float64 (float64 accumulation).
"""
from __future__ import annotations

import torch

from lfi.backends.cuda import _ext


def attention_forward(q, k, v, mask, scale: float, is_causal: bool, w_start: int, w_stop: int, kl_target=None):
    """Returns out (B, H, M, Dv); stats (B, H, M, 2) float32 (float64 for float64 input): the row
    max m and log l, l = sum exp(S - m); weights (B, H, w_stop - w_start, N); and, with kl_target,
    kl and tnorm (B, H, M) (else None, None)."""
    out, stats, weights, kl, tnorm = _ext.ops().attention_fwd(
        q, k, v, mask, float(scale), bool(is_causal), int(w_start), int(w_stop), kl_target
    )
    if kl_target is None:
        kl = tnorm = None
    return out, stats, weights, kl, tnorm


def attention_backward(grad_out, grad_weights, q, k, v, out, stats, mask, scale: float, is_causal: bool,
                       w_start: int, w_stop: int, mask_grad: bool, kl_target=None, tnorm=None, grad_kl=None):
    """Returns (dq, dk, dv, dmask), contiguous; dmask (the mask's shape and dtype) only when mask_grad.
    grad_out None (no gradient reaches out) is read as zeros: the extension has no dO-free variant."""
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_weights is not None and grad_weights.numel() == 0:
        grad_weights = None
    if grad_kl is None:
        kl_target = tnorm = None
    dq, dk, dv, dmask = _ext.ops().attention_bwd(
        grad_out, grad_weights, q, k, v, out, stats, mask, float(scale), bool(is_causal), int(w_start), int(w_stop),
        bool(mask_grad and mask is not None), kl_target, tnorm, grad_kl,
    )
    return dq, dk, dv, (dmask if mask_grad and mask is not None else None)
