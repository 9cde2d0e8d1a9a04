"""Launchers for the Triton KL kernels on dense student logits (lfi.kernels.attention_kl).

Same contract as lfi.backends.torch.attention_kl: logits (B, H, M, N) with any strides,
float16/bfloat16/float32; target and key_mask 4-D, broadcastable to it (size-1 dims are read with
stride 0, never expanded in memory). The forward reads the logits and the target once; the backward
recomputes p and t per tile from the saved row statistics.

Block configurations (see lfi.backends.triton._launch for how they are chosen): the kernels are
memory-bound row reductions without matrix products, so each has a short list of block shapes
(`_TABLE`), autotuned on first use of a (bucket(M), bucket(N), mask, target kind, dtypes) key; with
LFI_AUTOTUNE=0 the first candidate is used. Blocks larger than the bucketed sizes are dropped for
small calls (`fit_buckets`). Under the CPU interpreter one fixed, small configuration is used.
"""
from __future__ import annotations

from functools import partial

import torch

from lfi.backends.triton._launch import TunedKernel, bucket, cdiv, configs_from, fit_buckets
from lfi.kernels import attention_kl as K

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_FEATURES = ["M_BUCKET", "N_BUCKET", "HAS_MASK", "KEY_MASK", "TARGET_IS_LOGITS"]


# Candidate configs per (kernel, logits dtype class: "16" = float16/bfloat16, "32" = float32), best
# first: the first is the LFI_AUTOTUNE=0 default. From the compiled-kernel report
# (benchmarks/kernel_report.py, sm_90): no candidate spills or uses shared memory beyond a few KB
# (no matrix products, nothing pipelined: num_stages is moot). The SASS instructions per score
# element of all these tiles are within ~8% of each other (probability and logit targets, masked
# and not), so the lists span row-block heights (more programs for few rows; 8- and 16-row blocks
# for M <= 16) and key-block widths (bytes in flight per program) rather than the SASS count.
_TABLE = {
    ("fwd", "16"): configs_from("16x128x4x2 32x64x4x2 64x64x4x2 8x256x4x2"),
    ("fwd", "32"): configs_from("16x128x4x2 32x64x4x2 64x64x4x2 8x256x4x2"),
    ("bwd", "16"): configs_from("16x128x4x2 32x128x4x2 32x64x4x2 8x256x4x2"),
    ("bwd", "32"): configs_from("16x128x4x2 32x64x4x2 16x128x8x2 8x256x4x2"),
}


def _candidates(kernel: str, named):
    """The table's list for the call (its first entry: the LFI_AUTOTUNE=0 default)."""
    configs = _TABLE[(kernel, "16" if named["LOGITS"].element_size() == 2 else "32")]
    return fit_buckets(configs, named["M_BUCKET"], named["N_BUCKET"])


_fwd = TunedKernel.from_table(K.kl_fwd_kernel, _TABLE, "fwd", _FEATURES, partial(_candidates, "fwd"))
_bwd = TunedKernel.from_table(K.kl_bwd_kernel, _TABLE, "bwd", _FEATURES, partial(_candidates, "bwd"))


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


def key_mask_only(has_mask: bool, strides) -> bool:
    """Whether a mask read with these broadcast (b, h, m, n) strides does not vary along the rows
    (key padding, e.g. (B, 1, 1, N)): the kernels then read one vector of keys per block."""
    return has_mask and strides[2] == 0


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
    _fwd(
        lambda meta: cdiv(M, meta["BLOCK_M"]) * B * H,
        logits, target_arg, mask_arg, kl, stats, tstats, logits.stride(), t_strides, m_strides,
        H, M, N, float(student_scale), float(target_scale), bucket(M), bucket(N),
        # The forward reads a key-padding mask as a tile: the compiled-kernel report counts 0.90 vs
        # 1.05 instructions per score (bf16, 16x128) for the vector form at M = N = 1024.
        HAS_MASK=has_mask, KEY_MASK=False,
        TARGET_IS_LOGITS=bool(target_is_logits),
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
    _bwd(
        lambda meta: cdiv(M, meta["BLOCK_M"]) * B * H,
        grad_kl, logits, target_arg, mask_arg, _row_stats(stats), _row_stats(tstats), dlogits,
        grad_kl.expand(B, H, M).stride(), logits.stride(), t_strides, m_strides,
        H, M, N, float(student_scale), float(target_scale), bucket(M), bucket(N),
        HAS_MASK=has_mask, KEY_MASK=key_mask_only(has_mask, m_strides),
        TARGET_IS_LOGITS=bool(target_is_logits),
    )
    return dlogits
