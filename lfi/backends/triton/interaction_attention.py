"""Launchers for the Triton attention kernels (lfi.kernels.interaction_attention).

Same contract as lfi.backends.reference.interaction_attention: q (B, H, M, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv),
mask 4-D broadcastable to (B, H, M, N) or None; float16/bfloat16/float32. On a GPU the block
sizes are autotuned; under the CPU interpreter one fixed, small configuration is used.
"""
from __future__ import annotations

import torch
import triton

from lfi.backends.triton._launch import Launcher, _block, _broadcast_strides, _configs, _precision, _strides
from lfi.kernels import INTERPRET
from lfi.kernels import interaction_attention as K

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_KEY = ["M", "N", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "HAS_MASK", "MASK_BOOL", "w_start", "w_stop"]
# kernel name -> (configs, autotune key); keys must name arguments of that kernel.
_TUNING = {
    "attention_fwd_kernel": (_configs([(128, 64), (64, 64), (128, 128), (64, 32), (32, 32)]), _KEY + ["HAS_KL"]),
    "attention_bwd_preprocess_kernel": (_configs([(64, 64), (128, 64), (32, 32)], stages=(2,)), _KEY + ["HAS_DW"]),
    "attention_bwd_dkdv_kernel": (_configs([(32, 64), (64, 64), (32, 128), (64, 128), (32, 32)]),
                                  _KEY + ["HAS_DW", "HAS_KL"]),
    "attention_bwd_dq_kernel": (_configs([(64, 64), (128, 64), (64, 32), (128, 32), (32, 32)]),
                                _KEY + ["HAS_DW", "HAS_KL", "WRITE_DS"]),
}
_launch = Launcher(K, _TUNING)


def _common(q, k, v, mask, is_causal):
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got q.dtype={q.dtype}; "
                        "use backend='torch' for float64")
    B, H, M, D = q.shape
    N, Dv = k.shape[2], v.shape[-1]
    if mask is not None:
        mask_bool = mask.dtype == torch.bool
        mask_arg = mask.view(torch.uint8) if mask_bool else mask
        mask_strides = _broadcast_strides(mask, (B, H, M, N))
    else:
        mask_bool, mask_arg, mask_strides = False, q, (0, 0, 0, 0)
    constexprs = dict(
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=_block(D), BLOCK_DV=_block(Dv),
        IS_CAUSAL=bool(is_causal), HAS_MASK=mask is not None, MASK_BOOL=mask_bool,
        DOT_FP32=INTERPRET and q.dtype == torch.bfloat16, PRECISION=_precision(q.dtype),
    )
    return mask_arg, mask_strides, constexprs


def attention_forward(q, k, v, mask, scale: float, is_causal: bool, w_start: int, w_stop: int, kl_target=None):
    """Returns out (B, H, M, Dv) q.dtype, stats (B, H, M, 2) float32 (row max, log of the row sum),
    weights (B, H, w_stop-w_start, N) q.dtype, and with kl_target (4-D probabilities) kl and tnorm
    (B, H, M) float32, else None, None."""
    mask_arg, mask_strides, constexprs = _common(q, k, v, mask, is_causal)
    B, H, M, _ = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(B, H, M, Dv, dtype=q.dtype, device=q.device)
    stats = torch.empty(B, H, M, 2, dtype=torch.float32, device=q.device)
    weights = torch.empty(B, H, w_stop - w_start, N, dtype=q.dtype, device=q.device)
    has_kl = kl_target is not None
    kl, tnorm = (torch.empty(B, H, M, dtype=torch.float32, device=q.device) for _ in range(2)) if has_kl else (None, None)
    _launch(
        "attention_fwd_kernel", lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * B * H,
        q, k, v, mask_arg, out, stats, weights if weights.numel() else out,
        kl_target if has_kl else out, kl if has_kl else stats, tnorm if has_kl else stats,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        *_strides(weights if weights.numel() else None), *_broadcast_strides(kl_target, (B, H, M, N)),
        H, H // Hkv, M, N, scale, w_start, w_stop,
        HAS_KL=has_kl, **constexprs,
    )
    return out, stats, weights, kl, tnorm


def attention_backward(grad_out, grad_weights, q, k, v, out, stats, mask, scale: float, is_causal: bool,
                       w_start: int, w_stop: int, mask_grad: bool, kl_target=None, tnorm=None, grad_kl=None):
    """Returns (dq, dk, dv, dmask); dmask is None unless mask_grad (float mask only). grad_kl
    (B, H, M), any strides, is the gradient of the fused per-row KL against kl_target."""
    mask_arg, mask_strides, constexprs = _common(q, k, v, mask, is_causal)
    B, H, M, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    has_dw = grad_weights is not None and grad_weights.numel() > 0
    g_arg = grad_weights if has_dw else grad_out
    g_strides = _strides(grad_weights if has_dw else None)
    has_kl = grad_kl is not None
    kl_args = (kl_target, tnorm, grad_kl) if has_kl else (q, stats, stats)
    kl_strides = (*_broadcast_strides(kl_target, (B, H, M, N)), *(grad_kl.stride() if has_kl else (0, 0, 0)))

    delta = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    _launch(
        "attention_bwd_preprocess_kernel", lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * B * H,
        out, grad_out, delta, q, k, mask_arg, stats, g_arg,
        *out.stride(), *grad_out.stride(), *q.stride(), *k.stride(), *mask_strides, *g_strides,
        H, H // Hkv, M, N, scale, w_start, w_stop,
        HAS_DW=has_dw, **constexprs,
    )
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch(
        "attention_bwd_dkdv_kernel", lambda meta: triton.cdiv(N, meta["BLOCK_N"]) * B * Hkv,
        q, k, v, mask_arg, grad_out, g_arg, stats, delta, dk, dv, *kl_args,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *grad_out.stride(), *g_strides,
        *dk.stride(), *dv.stride(), *kl_strides,
        H, Hkv, H // Hkv, M, N, scale, w_start, w_stop,
        HAS_DW=has_dw, HAS_KL=has_kl, **constexprs,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # dS is written only when an additive mask needs its gradient (it is as large as the maps).
    ds = torch.zeros(B, H, M, N, dtype=torch.float32, device=q.device) if mask_grad else delta
    _launch(
        "attention_bwd_dq_kernel", lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * B * H,
        q, k, v, mask_arg, grad_out, g_arg, stats, delta, dq, ds, *kl_args,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *grad_out.stride(), *g_strides, *dq.stride(),
        *kl_strides,
        H, H // Hkv, M, N, scale, w_start, w_stop,
        HAS_DW=has_dw, HAS_KL=has_kl, WRITE_DS=mask_grad, **constexprs,
    )
    dmask = None
    if mask_grad:
        dims = [i for i, size in enumerate(mask.shape) if size == 1]
        dmask = (ds.sum(dims, keepdim=True) if dims else ds).to(mask.dtype)
    return dq, dk, dv, dmask
