"""attention_kl_qk: the attention KL loss with student logits scale * q k^T never materialized.

The target is a dense tensor or an implicit teacher (q_t, k_t) whose logits scale_t * q_t k_t^T are
never materialized either. Extra memory is O(B * H * M) in forward and backward.
Layers: backend kernels -> custom ops `lfi::attention_kl_qk_fwd/_bwd` (fake + autograd) -> API; in plain
eager mode the API runs the kernels with the same autograd without the dispatcher (lfi.ops._functorch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lfi import _dispatch
from lfi._numerics import MAX_HEAD_DIM, compute_dtype
from lfi.ops import _double_backward as double_backward
from lfi.ops import _vmap
from lfi.ops._functorch import call_op, eager_function, functorch_function
from lfi.ops._kl import check_dense_target, check_options, reduce_rows, target_scale
from lfi.ops._validation import check_float, check_key_mask, check_qkv, check_tensor, empty_dims

OP = "attention_kl_qk"


@torch.library.custom_op("lfi::attention_kl_qk_fwd", mutates_args=())
def attention_kl_qk_fwd(
    q: Tensor, k: Tensor, target: Optional[Tensor], q_t: Optional[Tensor], k_t: Optional[Tensor],
    key_mask: Optional[Tensor], student_scale: float, target_scale: float, target_is_logits: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """kl (B, H, M) per row and the row statistics stats, tstats (B, H, M, 2) (see
    lfi::attention_kl_fwd); float32 (float64 for float64 inputs)."""
    return _forward_kernels(q, k, target, q_t, k_t, key_mask, student_scale, target_scale, target_is_logits, backend)


def _forward_kernels(q, k, target, q_t, k_t, key_mask, student_scale, target_scale, target_is_logits, backend):
    """The body of attention_kl_qk_fwd (also run directly in plain eager mode)."""
    return _dispatch.implementation(backend, OP).kl_qk_forward(
        q, k, target, q_t, k_t, key_mask, student_scale, target_scale, target_is_logits
    )


@attention_kl_qk_fwd.register_fake
def _(q, k, target, q_t, k_t, key_mask, student_scale, target_scale, target_is_logits, backend):
    dtype = compute_dtype(q.dtype)
    kl = q.new_empty(q.shape[:-1], dtype=dtype)
    stats = q.new_empty((*q.shape[:-1], 2), dtype=dtype)
    return kl, stats, torch.empty_like(stats)


@torch.library.custom_op("lfi::attention_kl_qk_bwd", mutates_args=())
def attention_kl_qk_bwd(
    grad_kl: Tensor, q: Tensor, k: Tensor, target: Optional[Tensor], q_t: Optional[Tensor], k_t: Optional[Tensor],
    key_mask: Optional[Tensor], stats: Tensor, tstats: Tensor, student_scale: float, target_scale: float,
    target_is_logits: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """(dq, dk) in q's and k's dtypes."""
    return _backward_kernels(grad_kl, q, k, target, q_t, k_t, key_mask, stats, tstats, student_scale, target_scale,
                             target_is_logits, backend)


def _backward_kernels(grad_kl, q, k, target, q_t, k_t, key_mask, stats, tstats, student_scale, target_scale,
                      target_is_logits, backend):
    """The body of attention_kl_qk_bwd (also run directly by _EagerKLQK's backward)."""
    return _dispatch.implementation(backend, OP).kl_qk_backward(
        grad_kl, q, k, target, q_t, k_t, key_mask, stats, tstats, student_scale, target_scale, target_is_logits
    )


@attention_kl_qk_bwd.register_fake
def _(grad_kl, q, k, target, q_t, k_t, key_mask, stats, tstats, student_scale, target_scale, target_is_logits,
      backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)


def _setup_context(ctx, inputs, output):
    q, k, target, q_t, k_t, key_mask, student_scale, target_scale, target_is_logits, backend = inputs
    _, stats, tstats = output
    ctx.save_for_backward(q, k, target, q_t, k_t, key_mask, stats, tstats)
    ctx.args = (student_scale, target_scale, target_is_logits, backend)
    ctx.mark_non_differentiable(stats, tstats)
    ctx.backward_op = torch.ops.lfi.attention_kl_qk_bwd


def _backward(ctx, grad_kl, grad_stats, grad_tstats):
    if grad_kl is None:  # no gradient reached kl (plain eager: gradients are not materialized)
        return (None,) * 10
    q, k, target, q_t, k_t, key_mask, stats, tstats = ctx.saved_tensors
    if torch.is_grad_enabled():
        # A differentiable backward is asked for (create_graph=True, gradgradcheck, torch.func): the
        # same gradients from differentiable torch ops (lfi.ops._double_backward), not the kernels.
        dq, dk = double_backward.kl_qk_backward(grad_kl, q, k, target, q_t, k_t, key_mask, *ctx.args[:3])
    else:
        dq, dk = ctx.backward_op(grad_kl, q, k, target, q_t, k_t, key_mask, stats, tstats, *ctx.args)
    return dq, dk, None, None, None, None, None, None, None, None


attention_kl_qk_fwd.register_autograd(_backward, setup_context=_setup_context)
_FULL, _BCAST = _vmap.FULL, _vmap.BCAST
_vmap.register(attention_kl_qk_fwd, [_FULL, _FULL, _BCAST, _FULL, _FULL, _BCAST] + [None] * 4)
_vmap.register(attention_kl_qk_bwd, [_FULL, _FULL, _FULL, _BCAST, _FULL, _FULL, _BCAST, _FULL, _FULL] + [None] * 4)


_FunctorchKLQK = functorch_function(
    torch.ops.lfi.attention_kl_qk_fwd, _setup_context, _backward,
    "attention_kl_qk_fwd with its autograd, for torch.func transforms (lfi.ops._functorch).")
_EagerKLQK = eager_function(
    _forward_kernels, _backward_kernels, _setup_context, _backward,
    "attention_kl_qk_fwd with its autograd, without the dispatcher (plain eager mode, lfi.ops._functorch).")


def _check_teacher(q_t, k_t, q: Tensor, k: Tensor) -> None:
    B, H, M, _ = q.shape
    N = k.shape[2]
    check_tensor("q_t", q_t, (4,), "(B, Ht, M, Dt) with Ht in {1, H}")
    check_tensor("k_t", k_t, (4,), "(B, Htk, N, Dt)")
    if q_t.shape[0] != B or q_t.shape[1] not in (1, H) or q_t.shape[2] != M:
        raise ValueError(f"q_t must have shape (B, Ht, M, Dt) = ({B}, 1 or {H}, {M}, Dt), got {tuple(q_t.shape)}")
    if k_t.shape[0] != B or k_t.shape[2] != N or k_t.shape[3] != q_t.shape[3]:
        raise ValueError(
            f"k_t must have shape (B, Htk, N, Dt) = ({B}, Htk, {N}, {q_t.shape[3]}), got {tuple(k_t.shape)}")
    if k_t.shape[1] == 0 or q_t.shape[1] % k_t.shape[1] != 0:
        raise ValueError(f"q_t has {q_t.shape[1]} heads and k_t {k_t.shape[1]}: needs Ht % Htk == 0")
    if q_t.dtype != k_t.dtype or q_t.device != q.device or k_t.device != q.device:
        raise TypeError(f"q_t and k_t must share one dtype and q's device, got q_t {q_t.dtype} on {q_t.device}, "
                        f"k_t {k_t.dtype} on {k_t.device}")
    if q_t.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q_t head dim must be <= {MAX_HEAD_DIM}, got {q_t.shape[-1]}")


def attention_kl_qk(
    q: Tensor, k: Tensor, target, *, scale: Optional[float] = None, scale_t: Optional[float] = None,
    target_is: str = "probs", temperature: float = 1.0, reduction: str = "batchmean",
    key_mask: Optional[Tensor] = None, validate: bool = False, backend: str = "auto",
) -> Tensor:
    """KL(target || softmax(scale * q k^T / temperature)) per query row, without the (M, N) map.

    Args:
        q: (B, H, M, D) student queries; k: (B, Hkv, N, D) student keys, H % Hkv == 0.
        target: dense (B, H or 1, M, N) teacher rows (see attention_kl's target_is), or a pair
            (q_t, k_t): q_t (B, Ht, M, Dt) with Ht in {1, H}, k_t (B, Htk, N, Dt), Ht % Htk == 0,
            giving teacher logits scale_t * q_t k_t^T, softened by the same temperature.
        scale: student logit scale, default D ** -0.5; scale_t: teacher's, default Dt ** -0.5.
        temperature, reduction, key_mask, validate, backend: as in attention_kl ("batchmean"
            divides by B, "mean" by B*H*M rows).

    Returns:
        The loss in float32 (float64 for float64 inputs). Gradients flow to q and k only.
    """
    check_tensor("q", q, (4,), "(B, H, M, D)")
    check_tensor("k", k, (4,), "(B, Hkv, N, D)")
    check_qkv(q, k, k)
    temperature = check_options(target_is, temperature, reduction)
    scale = check_float("scale", scale, none_ok=True)
    scale_t = check_float("scale_t", scale_t, none_ok=True)
    empty = empty_dims(q, k)
    if empty:
        raise ValueError(
            f"attention_kl_qk got empty inputs: q {tuple(q.shape)} as (B, H, M, D), k {tuple(k.shape)} as "
            f"(B, Hkv, N, D) have {', '.join(empty)}; B, H, M and N must be >= 1 (a KL loss over no rows "
            "or no keys has no value)")
    B, H, M, D = q.shape
    N = k.shape[2]
    student_scale = (D ** -0.5 if scale is None else scale) / temperature
    q_t = k_t = dense = None
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(f"an implicit target must be a pair (q_t, k_t), got {len(target)} items")
        q_t, k_t = target
        _check_teacher(q_t, k_t, q, k)
        t_scale = (q_t.shape[-1] ** -0.5 if scale_t is None else scale_t) / temperature
        is_logits = True
    else:
        if scale_t is not None:
            raise ValueError("scale_t applies to an implicit (q_t, k_t) target only")
        dense = check_dense_target(target, (B, H, M, N), q, target_is, validate)
        t_scale, is_logits = target_scale(target_is, temperature), target_is != "probs"
    mask4 = check_key_mask(key_mask, (B, H, M, N), q.device)
    name = _dispatch.resolve(backend, q.device)
    args = (q, k, dense, q_t, k_t, mask4, student_scale, t_scale, is_logits, name)
    kl, _, _ = call_op(args, args[:6], torch.ops.lfi.attention_kl_qk_fwd, _FunctorchKLQK, _EagerKLQK,
                       _forward_kernels)
    return reduce_rows(kl, reduction, B)
