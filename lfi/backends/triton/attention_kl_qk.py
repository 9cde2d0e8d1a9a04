"""Launchers for the Triton KL kernels with student logits s = (q k^T) * student_scale computed tile
by tile (lfi.kernels.attention_kl_qk).

Same contract as lfi.backends.reference.attention_kl_qk: q (B, H, M, D), k (B, Hkv, N, D),
H % Hkv == 0, any strides, float16/bfloat16/float32, D <= 256; the target is dense (4-D,
broadcastable to (B, H, M, N)) or implicit, u = (q_t k_t^T) * target_scale with q_t (B, Ht, M, Dt),
Ht in {1, H}, and k_t (B, Htk, N, Dt), Ht % Htk == 0. Extra memory is O(B * H * M): no (M, N) map of
the student or the teacher is allocated. On a GPU the block sizes are autotuned (smaller tiles for
large head dims); under the CPU interpreter one fixed, small configuration is used.
"""
from __future__ import annotations

import torch
import triton

from lfi.backends.triton._launch import Launcher, _block, _configs, _precision
from lfi.backends.triton.attention_kl import SUPPORTED_DTYPES, _check_dtype, _mask_arg, _row_stats, _target_arg
from lfi.kernels import INTERPRET
from lfi.kernels import attention_kl_qk as K

MAX_HEAD_DIM = 256
_KEY = ["M", "N", "HEAD_DIM", "HEAD_DIM_T", "HAS_MASK", "TARGET_IS_LOGITS", "IMPLICIT"]
_TUNING = {
    "kl_qk_fwd_kernel": (_configs([(128, 64), (64, 64), (128, 128), (64, 32), (32, 32)]), _KEY),
    "kl_qk_bwd_dq_kernel": (_configs([(64, 64), (128, 64), (64, 32), (128, 32), (32, 32)]), _KEY),
    "kl_qk_bwd_dk_kernel": (_configs([(32, 64), (64, 64), (32, 128), (64, 128), (32, 32)]), _KEY),
}
_launch = Launcher(K, _TUNING)


def _args(q, k, target, q_t, k_t, key_mask, student_scale, target_scale, target_is_logits):
    """(pointer args, stride args, head args, scales, constexprs) shared by the three kernels."""
    _check_dtype("q", q)
    _check_dtype("k", k)
    B, H, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[-1] != D or H % Hkv != 0:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (need H % Hkv == 0)")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got {D}")
    shape = (B, H, M, N)
    implicit = target is None
    if implicit:
        if q_t is None or k_t is None:
            raise ValueError("an implicit teacher needs both q_t and k_t")
        Ht, Htk, Dt = q_t.shape[1], k_t.shape[1], q_t.shape[-1]
        if Ht not in (1, H) or Ht % Htk != 0 or k_t.shape[-1] != Dt or q_t.shape[2] != M or k_t.shape[2] != N:
            raise ValueError(f"teacher q_t {tuple(q_t.shape)}, k_t {tuple(k_t.shape)} do not match q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)} (need Ht in (1, H), Ht % Htk == 0)")
        if Dt > MAX_HEAD_DIM:
            raise ValueError(f"backend='triton' supports teacher head dims up to {MAX_HEAD_DIM}, got {Dt}")
        if q_t.dtype not in SUPPORTED_DTYPES:
            q_t = q_t.to(torch.float32)
        if k_t.dtype not in SUPPORTED_DTYPES:
            k_t = k_t.to(torch.float32)
        # tl.dot needs one operand dtype: the kernels cast k_t tiles to q_t's dtype.
        target_arg, t_strides = q, (0, 0, 0, 0)
        qt_arg, kt_arg = q_t, k_t
        qt_strides = tuple(q_t.expand(B, Ht, M, Dt).stride())
        kt_strides = tuple(k_t.expand(B, Htk, N, Dt).stride())
        heads = (1 if Ht == H else 0, Ht // Htk)
        is_logits, t_dtype = True, q_t.dtype
    else:
        Dt = 1
        target_arg, t_strides = _target_arg(target, shape)
        qt_arg, kt_arg = q, k
        qt_strides = kt_strides = (0, 0, 0, 0)
        heads = (0, 1)
        is_logits, t_dtype = bool(target_is_logits), q.dtype
    mask_arg, m_strides, has_mask = _mask_arg(key_mask, shape, q)
    bf16 = torch.bfloat16 in (q.dtype, k.dtype, t_dtype)
    constexprs = dict(
        HEAD_DIM=D, HEAD_DIM_T=Dt, BLOCK_D=_block(D), BLOCK_DT=_block(Dt),
        HAS_MASK=has_mask, TARGET_IS_LOGITS=is_logits, IMPLICIT=implicit,
        # The CPU interpreter multiplies raw bf16 bits in tl.dot: give it float32 operands.
        DOT_FP32=INTERPRET and bf16, PRECISION=_precision(q.dtype), T_PRECISION=_precision(t_dtype),
    )
    pointers = (target_arg, qt_arg, kt_arg, mask_arg)
    strides = (*t_strides, *qt_strides, *kt_strides, *m_strides)
    scales = (float(student_scale), float(target_scale))
    return pointers, strides, heads, scales, constexprs


def kl_qk_forward(q, k, target, q_t, k_t, key_mask, student_scale: float, target_scale: float,
                  target_is_logits: bool):
    """Returns kl (B, H, M), stats, tstats (B, H, M, 2): float32, contiguous."""
    pointers, strides, heads, scales, constexprs = _args(q, k, target, q_t, k_t, key_mask, student_scale,
                                                        target_scale, target_is_logits)
    B, H, M, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    kl = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    stats, tstats = (torch.empty(B, H, M, 2, dtype=torch.float32, device=q.device) for _ in range(2))
    if kl.numel() == 0:
        return kl, stats, tstats
    target_arg, qt_arg, kt_arg, mask_arg = pointers
    t_strides, qt_strides, kt_strides, m_strides = strides[:4], strides[4:8], strides[8:12], strides[12:]
    _launch(
        "kl_qk_fwd_kernel", lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * B * H,
        q, k, target_arg, qt_arg, kt_arg, mask_arg, kl, stats, tstats,
        *q.stride(), *k.stride(), *t_strides, *qt_strides, *kt_strides, *m_strides,
        H, H // Hkv, *heads, M, N, *scales,
        **constexprs,
    )
    return kl, stats, tstats


def kl_qk_backward(grad_kl, q, k, target, q_t, k_t, key_mask, stats, tstats, student_scale: float,
                   target_scale: float, target_is_logits: bool):
    """Returns (dq, dk) in q's and k's dtypes: dS = grad_kl * (p - t), dq = student_scale dS k,
    dk = student_scale dS^T q summed over each kv head's query heads. No gradient to the target."""
    pointers, strides, heads, scales, constexprs = _args(q, k, target, q_t, k_t, key_mask, student_scale,
                                                        target_scale, target_is_logits)
    B, H, M, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * H * M == 0 or N == 0:
        return dq.zero_(), dk.zero_()
    target_arg, qt_arg, kt_arg, mask_arg = pointers
    stats, tstats = _row_stats(stats), _row_stats(tstats)
    g_strides = grad_kl.expand(B, H, M).stride()
    _launch(
        "kl_qk_bwd_dq_kernel", lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * B * H,
        grad_kl, q, k, target_arg, qt_arg, kt_arg, mask_arg, stats, tstats, dq,
        *g_strides, *q.stride(), *k.stride(), *strides, *dq.stride(),
        H, H // Hkv, *heads, M, N, *scales,
        **constexprs,
    )
    _launch(
        "kl_qk_bwd_dk_kernel", lambda meta: triton.cdiv(N, meta["BLOCK_N"]) * B * Hkv,
        grad_kl, q, k, target_arg, qt_arg, kt_arg, mask_arg, stats, tstats, dk,
        *g_strides, *q.stride(), *k.stride(), *strides, *dk.stride(),
        H, Hkv, H // Hkv, *heads, M, N, *scales,
        **constexprs,
    )
    return dq, dk
