"""attention_kl: KL(target || softmax(student_logits / T)) per attention row, fused.

Layers: backend kernels -> custom ops `lfi::attention_kl_fwd/_bwd` (fake + autograd) -> API; in plain
eager mode the API runs the kernels with the same autograd without the dispatcher (lfi.ops._functorch).
No gradient flows to the target (it is a teacher signal).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lfi import _dispatch
from lfi._numerics import compute_dtype
from lfi.ops import _double_backward as double_backward
from lfi.ops import _vmap
from lfi.ops._functorch import call_op, eager_function, functorch_function
from lfi.ops._kl import check_dense_target, check_options, reduce_rows, target_scale
from lfi.ops._validation import check_key_mask, check_tensor

OP = "attention_kl"


def _stats_dtype(t: Tensor) -> torch.dtype:
    return compute_dtype(t.dtype)


@torch.library.custom_op("lfi::attention_kl_fwd", mutates_args=())
def attention_kl_fwd(
    logits: Tensor, target: Tensor, key_mask: Optional[Tensor], student_scale: float, target_scale: float,
    target_is_logits: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """kl (B, H, M) per row and the row statistics the backward needs, kept as pairs: stats
    (B, H, M, 2) = the student's (row max, log l), tstats (B, H, M, 2) = the target's (shift, log
    normaliser); float32 (float64 for float64 logits)."""
    return _forward_kernels(logits, target, key_mask, student_scale, target_scale, target_is_logits, backend)


def _forward_kernels(logits, target, key_mask, student_scale, target_scale, target_is_logits, backend):
    """The body of attention_kl_fwd (also run directly in plain eager mode)."""
    return _dispatch.implementation(backend, OP).kl_forward(
        logits, target, key_mask, student_scale, target_scale, target_is_logits
    )


@attention_kl_fwd.register_fake
def _(logits, target, key_mask, student_scale, target_scale, target_is_logits, backend):
    kl = logits.new_empty(logits.shape[:-1], dtype=_stats_dtype(logits))
    stats = logits.new_empty((*logits.shape[:-1], 2), dtype=_stats_dtype(logits))
    return kl, stats, torch.empty_like(stats)


@torch.library.custom_op("lfi::attention_kl_bwd", mutates_args=())
def attention_kl_bwd(
    grad_kl: Tensor, logits: Tensor, target: Tensor, key_mask: Optional[Tensor], stats: Tensor, tstats: Tensor,
    student_scale: float, target_scale: float, target_is_logits: bool, backend: str,
) -> Tensor:
    """dlogits (B, H, M, N) in logits.dtype."""
    return _backward_kernels(grad_kl, logits, target, key_mask, stats, tstats, student_scale, target_scale,
                             target_is_logits, backend)


def _backward_kernels(grad_kl, logits, target, key_mask, stats, tstats, student_scale, target_scale,
                      target_is_logits, backend):
    """The body of attention_kl_bwd (also run directly by _EagerKL's backward)."""
    return _dispatch.implementation(backend, OP).kl_backward(
        grad_kl, logits, target, key_mask, stats, tstats, student_scale, target_scale, target_is_logits
    )


@attention_kl_bwd.register_fake
def _(grad_kl, logits, target, key_mask, stats, tstats, student_scale, target_scale, target_is_logits, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, key_mask, student_scale, target_scale, target_is_logits, backend = inputs
    _, stats, tstats = output
    ctx.save_for_backward(logits, target, key_mask, stats, tstats)
    ctx.args = (student_scale, target_scale, target_is_logits, backend)
    ctx.mark_non_differentiable(stats, tstats)
    ctx.backward_op = torch.ops.lfi.attention_kl_bwd


def _backward(ctx, grad_kl, grad_stats, grad_tstats):
    if grad_kl is None:  # no gradient reached kl (plain eager: gradients are not materialized)
        return (None,) * 7
    logits, target, key_mask, stats, tstats = ctx.saved_tensors
    if torch.is_grad_enabled():
        # A differentiable backward is asked for (create_graph=True, gradgradcheck, torch.func): the
        # same gradient from differentiable torch ops (lfi.ops._double_backward), not the kernels.
        dlogits = double_backward.kl_backward(grad_kl, logits, target, key_mask, *ctx.args[:3])
    else:
        dlogits = ctx.backward_op(grad_kl, logits, target, key_mask, stats, tstats, *ctx.args)
    return dlogits, None, None, None, None, None, None


attention_kl_fwd.register_autograd(_backward, setup_context=_setup_context)
_vmap.register(attention_kl_fwd, [_vmap.FULL, _vmap.BCAST, _vmap.BCAST] + [None] * 4)
_vmap.register(attention_kl_bwd, [_vmap.FULL, _vmap.FULL, _vmap.BCAST, _vmap.BCAST, _vmap.FULL, _vmap.FULL]
               + [None] * 4)


_FunctorchKL = functorch_function(
    torch.ops.lfi.attention_kl_fwd, _setup_context, _backward,
    "attention_kl_fwd with its autograd, for torch.func transforms (lfi.ops._functorch).")
_EagerKL = eager_function(
    _forward_kernels, _backward_kernels, _setup_context, _backward,
    "attention_kl_fwd with its autograd, without the dispatcher (plain eager mode, lfi.ops._functorch).")


def attention_kl(
    student_logits: Tensor, target: Tensor, *, target_is: str = "probs", temperature: float = 1.0,
    reduction: str = "batchmean", key_mask: Optional[Tensor] = None, validate: bool = False,
    backend: str = "auto",
) -> Tensor:
    """KL(target || softmax(student_logits / temperature)) over the last (key) dim, per row.

    Args:
        student_logits: (B, H, M, N) attention logits (any leading layout of 2 to 4 dims, rows over
            the last dim); float16/bfloat16/float32 (float64 on the torch backend).
        target: teacher rows broadcastable to the student's shape, e.g. (B, 1, M, N) for one map per
            query shared by all heads. target_is="probs": non-negative weights (a negative one
            raises ValueError on the CPU or with validate=True; elsewhere it is not checked, a
            check would synchronise with the GPU, and gives that row's KL NaN, as F.kl_div);
            "logits": softmax of target / temperature; "log_probs": softmax of target
            (temperature not applied).
        key_mask: bool, True = keep, broadcastable to the student's shape (e.g. (B, 1, 1, N)).
            Dropped keys are excluded from both distributions, which are renormalised over the kept
            keys. Rows with no kept key, or with zero target mass, contribute 0.
        reduction: "none" -> per-row KL (student shape without the last dim); "sum" -> sum over
            rows; "mean" -> sum / number of rows (B*H*M; unlike F.kl_div, not / B*H*M*N);
            "batchmean" -> sum / B (the student's first dim, as F.kl_div).
        validate: also check that target rows sum to 1 (probs, log_probs) and, on any device, that
            probabilities are non-negative; raises ValueError. Synchronises with the device.
        backend: "auto" | "torch" | "triton".

    Returns:
        The loss in float32 (float64 for float64 logits). Gradient flows to student_logits only:
        d/d logits = (softmax(s) - t) / temperature per row.
    """
    check_tensor("student_logits", student_logits, (2, 3, 4), "(B, H, M, N)")
    temperature = check_options(target_is, temperature, reduction)
    batch, row_shape = student_logits.shape[0], student_logits.shape[:-1]
    logits = student_logits.reshape((1,) * (4 - student_logits.dim()) + tuple(student_logits.shape))
    if logits.numel() == 0:
        empty = [f"{n}=0" for n, size in zip("BHMN", logits.shape) if size == 0]
        raise ValueError(
            f"student_logits is empty: shape {tuple(student_logits.shape)} as (B, H, M, N) has {', '.join(empty)}; "
            "every dim must be >= 1 (a KL loss over no rows or no keys has no value)")
    target4 = check_dense_target(target, logits.shape, logits, target_is, validate)
    mask4 = check_key_mask(key_mask, logits.shape, logits.device)
    name = _dispatch.resolve(backend, logits.device)
    args = (logits, target4, mask4, 1.0 / float(temperature), target_scale(target_is, float(temperature)),
            target_is != "probs", name)
    kl, _, _ = call_op(args, (logits, target4, mask4), torch.ops.lfi.attention_kl_fwd, _FunctorchKL, _EagerKL,
                       _forward_kernels)
    return reduce_rows(kl.reshape(row_shape), reduction, batch)
