"""Launchers for the Triton KL kernels on dense student logits (lfi.kernels.attention_kl).

Same contract as lfi.backends.reference.attention_kl: logits (B, H, M, N) with any strides,
float16/bfloat16/float32; target and key_mask 4-D, broadcastable to it (size-1 dims are read with
stride 0, never expanded in memory). The forward reads the logits and the target once; the backward
recomputes p and t per tile from the saved row statistics. On a GPU the block sizes are autotuned;
under the CPU interpreter one fixed, small configuration is used.
"""
from __future__ import annotations

import torch
import triton

from lfi.backends.triton._launch import Launcher, _configs
from lfi.kernels import attention_kl as K

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Memory-bound row reductions: wide key blocks, few rows per program.
_SHAPES = [(16, 128), (32, 128), (16, 256), (8, 256), (8, 512), (32, 64), (64, 64)]
_KEY = ["M", "N", "HAS_MASK", "TARGET_IS_LOGITS"]
_TUNING = {
    "kl_fwd_kernel": (_configs(_SHAPES), _KEY),
    "kl_bwd_kernel": (_configs(_SHAPES), _KEY),
}
_launch = Launcher(K, _TUNING, prune=None)


def _check_dtype(name: str, t: torch.Tensor):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {name}.dtype={t.dtype}; "
                        "use backend='torch' for float64")


def _target_arg(target: torch.Tensor, shape):
    """(tensor, strides) reading target as broadcast to shape; non-float targets become float32."""
    if not target.is_floating_point():
        target = target.to(torch.float32)
    return target, tuple(target.expand(shape).stride())


def _mask_arg(key_mask, shape, fallback: torch.Tensor):
    """(tensor, strides, has_mask): a bool mask is read as uint8 with broadcast strides."""
    if key_mask is None:
        return fallback, (0, 0, 0, 0), False
    if key_mask.dtype != torch.bool:
        key_mask = key_mask != 0
    return key_mask.view(torch.uint8), tuple(key_mask.expand(shape).stride()), True


def _row_stats(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def kl_forward(logits, target, key_mask, student_scale: float, target_scale: float, target_is_logits: bool):
    """Returns kl (B, H, M), stats, tstats (B, H, M, 2): float32, contiguous."""
    _check_dtype("logits", logits)
    B, H, M, N = logits.shape
    shape = (B, H, M, N)
    kl = torch.empty(B, H, M, dtype=torch.float32, device=logits.device)
    stats, tstats = (torch.empty(B, H, M, 2, dtype=torch.float32, device=logits.device) for _ in range(2))
    if kl.numel() == 0:
        return kl, stats, tstats
    target_arg, t_strides = _target_arg(target, shape)
    mask_arg, m_strides, has_mask = _mask_arg(key_mask, shape, logits)
    _launch(
        "kl_fwd_kernel", lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * B * H,
        logits, target_arg, mask_arg, kl, stats, tstats,
        *logits.stride(), *t_strides, *m_strides,
        H, M, N, float(student_scale), float(target_scale),
        HAS_MASK=has_mask, TARGET_IS_LOGITS=bool(target_is_logits),
    )
    return kl, stats, tstats


def kl_backward(grad_kl, logits, target, key_mask, stats, tstats, student_scale: float, target_scale: float,
                target_is_logits: bool):
    """Returns dlogits (B, H, M, N), logits.dtype, contiguous: grad_kl * (p - t) * student_scale."""
    _check_dtype("logits", logits)
    B, H, M, N = logits.shape
    shape = (B, H, M, N)
    dlogits = torch.empty(shape, dtype=logits.dtype, device=logits.device)
    if dlogits.numel() == 0:
        return dlogits
    target_arg, t_strides = _target_arg(target, shape)
    mask_arg, m_strides, has_mask = _mask_arg(key_mask, shape, logits)
    _launch(
        "kl_bwd_kernel", lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * B * H,
        grad_kl, logits, target_arg, mask_arg, _row_stats(stats), _row_stats(tstats), dlogits,
        *grad_kl.expand(B, H, M).stride(), *logits.stride(), *t_strides, *m_strides,
        H, M, N, float(student_scale), float(target_scale),
        HAS_MASK=has_mask, TARGET_IS_LOGITS=bool(target_is_logits),
    )
    return dlogits
