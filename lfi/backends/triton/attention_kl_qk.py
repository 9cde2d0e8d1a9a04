"""Launchers for the Triton KL kernels with student logits s = (q k^T) * student_scale computed tile
by tile (lfi.kernels.attention_kl_qk).

Same contract as lfi.backends.torch.attention_kl_qk: q (B, H, M, D), k (B, Hkv, N, D),
H % Hkv == 0, any strides, float16/bfloat16/float32, D <= 256; the target is dense (4-D,
broadcastable to (B, H, M, N)) or implicit, u = (q_t k_t^T) * target_scale with q_t (B, Ht, M, Dt),
Ht in {1, H}, and k_t (B, Htk, N, Dt), Ht % Htk == 0. Extra memory is O(B * H * M): no (M, N) map of
the student or the teacher is allocated.

Block configurations (see lfi.backends.triton._launch for how they are chosen): each kernel has a
short list per head-dim class, dtype class and teacher kind (`_TABLE`); `_candidates` drops the
configs whose estimated shared memory exceeds the device's and blocks larger than the bucketed
sizes, and with LFI_AUTOTUNE=0 the first candidate is used. Autotuning is keyed on bucket(M),
bucket(N), the head dims, the feature constexprs, the precisions and the dtypes. Under the CPU
interpreter one fixed, small configuration is used.
"""
from __future__ import annotations

from functools import partial

import torch

from lfi._numerics import MAX_HEAD_DIM
from lfi.backends.triton._launch import (
    TunedKernel,
    _block,
    _precision,
    bucket,
    cdiv,
    configs_from,
    fit_buckets,
    smem_limit,
)
from lfi.backends.triton.attention_kl import (
    SUPPORTED_DTYPES,
    _check_dtype,
    _mask_arg,
    _row_stats,
    _target_arg,
    key_mask_only,
)
from lfi.kernels import INTERPRET
from lfi.kernels import attention_kl_qk as K

_FEATURES = ["M_BUCKET", "N_BUCKET", "HEAD_DIM", "HEAD_DIM_T", "HAS_MASK", "KEY_MASK", "TARGET_IS_LOGITS",
             "IMPLICIT", "PRECISION", "T_PRECISION"]

# Candidate configs per (kernel, head-dim class, dtype class, implicit teacher), best first: the
# first is the LFI_AUTOTUNE=0 default. Chosen from the compiled-kernel report
# (benchmarks/kernel_report.py, sm_90). Head-dim class: the larger of the student's and (implicit)
# teacher's head-dim blocks (<= 64, 128, 256). dtype class: "16" when every matrix product takes
# float16/bfloat16 operands, else the float32 precision ("tf32" or "tf32x3", see _launch._precision).
# None = any. For 16-bit inputs at head dims <= 128 no candidate spills registers or exceeds shared
# memory and every matrix product is a wgmma (row blocks of 64 or more; for dk, 64 or more queries
# and keys), also with a key mask and at M = N = 197 (tiles at 240+ registers for M = N = 1024
# spill there and are left out) - except a dense target whose row stride is not a multiple of 16
# bytes at D = 128: its unvectorized loads pull the row math into a lane-spread layout and every
# tile spills (a kernel matter, not a config one). The order follows the SASS instructions per
# score element. 3xTF32 needs about twice the registers of TF32: small tiles, the only ones that do
# not spill. dk tiles are BLOCK_M queries x BLOCK_N keys.
# A data table, one row per key: rows alike by design (not code to fold into a function).
_TABLE = {
    ("fwd", 64, "16", False): configs_from("128x64x8x3 64x64x4x3 128x64x8x2 64x32x4x3"),
    ("fwd", 128, "16", False): configs_from("128x64x8x3 64x64x4x3 128x64x8x2 64x32x4x3"),
    ("fwd", 64, "16", True): configs_from("128x128x8x3 128x64x8x3 128x128x8x2 64x64x4x2"),
    ("fwd", 128, "16", True): configs_from("128x64x8x3 128x64x8x2 64x64x4x2 64x64x4x3"),
    ("fwd", 64, "tf32", False): configs_from("64x64x4x2 128x64x8x2 64x64x4x3 64x32x4x2"),
    ("fwd", 64, "tf32", True): configs_from("128x64x8x3 128x128x8x2 128x64x8x2 64x64x4x2"),
    ("fwd", 128, "tf32", False): configs_from("64x64x4x2 64x64x4x3 128x64x8x2 64x32x4x2"),
    ("fwd", 128, "tf32", True): configs_from("64x64x4x2 64x32x4x3 64x32x4x2"),
    ("fwd", 64, "tf32x3", None): configs_from("128x64x8x2 64x64x4x2 64x32x4x2"),
    ("fwd", 128, "tf32x3", False): configs_from("64x32x4x2 64x64x8x2"),
    ("fwd", 128, "tf32x3", True): configs_from("64x32x4x2 64x32x8x2"),
    ("fwd", None, None, None): configs_from("64x32x4x2 32x32x4x2"),
    ("dq", 64, "16", False): configs_from("128x64x8x2 64x64x4x2 64x32x4x2"),
    ("dq", 64, "16", True): configs_from("128x64x8x3 64x64x4x2 64x32x4x2"),
    ("dq", 128, "16", False): configs_from("128x64x8x2 64x64x4x2 64x64x4x3 128x32x8x2"),
    ("dq", 128, "16", True): configs_from("128x64x8x2 64x64x4x3 64x64x4x2 128x32x8x2"),
    ("dq", 64, "tf32", False): configs_from("128x64x8x2 64x64x4x2 128x32x8x2 64x32x4x2"),
    ("dq", 64, "tf32", True): configs_from("128x64x8x2 64x64x4x3 64x64x4x2 64x32x4x2"),
    ("dq", 128, "tf32", False): configs_from("128x32x8x2 64x32x4x2 128x64x8x2"),
    ("dq", 128, "tf32", True): configs_from("128x32x8x2 64x32x4x2 64x32x4x3"),
    ("dq", 64, "tf32x3", None): configs_from("128x64x8x2 128x32x8x2 64x64x4x2 64x32x4x2"),
    ("dq", 128, "tf32x3", False): configs_from("128x32x8x2 32x32x4x2"),
    ("dq", 128, "tf32x3", True): configs_from("64x32x8x2 32x32x8x2"),
    ("dq", None, None, None): configs_from("64x32x4x2 32x32x4x2"),
    ("dk", 64, "16", False): configs_from("128x64x4x2 64x64x4x2 128x64x8x2"),
    ("dk", 64, "16", True): configs_from("128x64x4x2 64x64x4x2 64x64x4x3 128x64x8x2"),
    ("dk", 128, "16", False): configs_from("128x64x4x2 64x64x4x2 64x64x4x3 128x64x8x2"),
    ("dk", 128, "16", True): configs_from("64x64x4x2 64x64x4x3 128x64x8x2"),
    ("dk", 64, "tf32", False): configs_from("64x64x4x2 128x64x8x2 64x64x4x3"),
    ("dk", 64, "tf32", True): configs_from("64x64x4x2 128x64x8x2 32x128x8x2"),
    ("dk", 128, "tf32", False): configs_from("64x64x4x2 128x64x8x2 64x64x4x3 32x128x8x2"),
    ("dk", 128, "tf32", True): configs_from("32x128x8x2 32x64x4x2 64x64x8x2"),
    ("dk", 64, "tf32x3", False): configs_from("32x64x8x2 32x128x8x2 32x32x4x2"),
    ("dk", 64, "tf32x3", True): configs_from("32x64x8x2 32x32x4x2"),
    ("dk", 128, "tf32x3", None): configs_from("32x32x8x2"),
    ("dk", None, None, None): configs_from("32x64x4x2 32x32x4x2"),
}


def _classes(named):
    """(head-dim class, dtype class, implicit) of a call."""
    implicit = bool(named["IMPLICIT"])
    block_d = max(named["BLOCK_D"], named["BLOCK_DT"] if implicit else 0)
    d_class = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    q_16 = named["Q"].element_size() == 2
    t_16 = not implicit or named["QT"].element_size() == 2
    dtype_class = "16" if q_16 and t_16 else (named["PRECISION"] if not q_16 else named["T_PRECISION"])
    return d_class, dtype_class, implicit


def _lookup(kernel: str, named):
    """The table's list for this call: the most specific entry that matches, else the kernel's
    generic one."""
    d_class, dtype_class, implicit = _classes(named)
    for key in ((kernel, d_class, dtype_class, implicit), (kernel, d_class, dtype_class, None),
                (kernel, None, None, None)):
        if key in _TABLE:
            return _TABLE[key]
    raise KeyError(kernel)


def _smem_bytes(kernel: str, cfg, named) -> int:
    """Shared memory of the kernel's pipelined tiles, fitted to the report's figures at D = 64/128
    (exact for the 16-bit and TF32 forward; otherwise mostly above them, at most 32 KB below for a
    few dense-target dq tiles): the student's (and implicit teacher's) rows or keys kept for the
    whole program, num_stages copies of the streamed ones (the dq kernel reads each K tile twice),
    the dense target tile, the dS tile that dk transposes; 3xTF32 keeps the split operands too."""
    bm, bn, stages = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages
    size = named["Q"].element_size()
    implicit = bool(named["IMPLICIT"])
    student = named["BLOCK_D"] * size
    width = student + (named["BLOCK_DT"] * named["QT"].element_size() if implicit else 0)
    target = 0 if implicit else bm * bn * named["TARGET"].element_size()
    x3 = "tf32x3" in (named["PRECISION"], named["T_PRECISION"])
    if kernel == "fwd":
        return bm * width + stages * bn * width + target + (bm * width + target if x3 else 0)
    if kernel == "dq":
        return ((bm * width if implicit else 0) + stages * (bn * (width + student) + target) + target
                + (bm * width if x3 else 0))
    wide = size == 4  # dk stages float32 dense target tiles once, not per pipeline stage
    return (bn * width + stages * (bm * width + (0 if wide else target)) + (target if wide else 0)
            + bm * bn * size + (bn * width + stages * bm * width if x3 else 0))


def _candidates(kernel: str, named):
    """The table's list for the call, without configs over the device's shared memory and, for
    small calls, without blocks larger than the bucketed sizes (see _launch.fit_buckets)."""
    configs = _lookup(kernel, named)
    limit = smem_limit(named["Q"].device)
    kept = [c for c in configs if _smem_bytes(kernel, c, named) <= limit]
    if not kept:
        return [min(configs, key=lambda c: _smem_bytes(kernel, c, named))]
    return fit_buckets(kept, named["M_BUCKET"], named["N_BUCKET"])


_fwd = TunedKernel.from_table(K.kl_qk_fwd_kernel, _TABLE, "fwd", _FEATURES, partial(_candidates, "fwd"))
_dq = TunedKernel.from_table(K.kl_qk_bwd_dq_kernel, _TABLE, "dq", _FEATURES, partial(_candidates, "dq"))
_dk = TunedKernel.from_table(K.kl_qk_bwd_dk_kernel, _TABLE, "dk", _FEATURES, partial(_candidates, "dk"))


def _args(q, k, target, q_t, k_t, key_mask, student_scale, target_scale, target_is_logits):
    """(pointer args, stride tuples (target, q_t, k_t, mask), head args, scales, constexprs) shared by
    the three kernels."""
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
        HAS_MASK=has_mask, KEY_MASK=key_mask_only(has_mask, m_strides), TARGET_IS_LOGITS=is_logits,
        IMPLICIT=implicit,
        # The CPU interpreter multiplies raw bf16 bits in tl.dot: give it float32 operands.
        DOT_FP32=INTERPRET and bf16, PRECISION=_precision(q.dtype), T_PRECISION=_precision(t_dtype),
    )
    pointers = (target_arg, qt_arg, kt_arg, mask_arg)
    strides = (t_strides, qt_strides, kt_strides, m_strides)
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
    _fwd(
        lambda meta: cdiv(M, meta["BLOCK_M"]) * B * H,
        q, k, target_arg, qt_arg, kt_arg, mask_arg, kl, stats, tstats, q.stride(), k.stride(), *strides,
        H, H // Hkv, *heads, M, N, *scales, bucket(M), bucket(N),
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
    _dq(
        lambda meta: cdiv(M, meta["BLOCK_M"]) * B * H,
        grad_kl, q, k, target_arg, qt_arg, kt_arg, mask_arg, stats, tstats, dq,
        g_strides, q.stride(), k.stride(), *strides, dq.stride(),
        H, H // Hkv, *heads, M, N, *scales, bucket(M), bucket(N),
        **constexprs,
    )
    _dk(
        lambda meta: cdiv(N, meta["BLOCK_N"]) * B * Hkv,
        grad_kl, q, k, target_arg, qt_arg, kt_arg, mask_arg, stats, tstats, dk,
        g_strides, q.stride(), k.stride(), *strides, dk.stride(),
        H, Hkv, H // Hkv, *heads, M, N, *scales, bucket(M), bucket(N),
        **constexprs,
    )
    return dq, dk
