"""interaction_attention: scaled dot-product attention that can also return its exact maps.

Layers: backend kernels (lfi.backends.*) -> custom ops `lfi::interaction_attention_fwd/_bwd` and
`lfi::attention_pv` (torch.library, with fake, autograd and vmap registrations) -> the functional API
below. In plain eager mode the API runs the same kernels with the same autograd without the
dispatcher (_EagerForward, _EagerPV); under torch.func transforms it calls the custom ops through
functorch-compatible autograd.Functions (_FunctorchForward, _FunctorchPV); under torch.compile,
export, tracing or tensor subclasses it calls the custom ops. Calls that want
no maps may instead go to F.scaled_dot_product_attention (lfi._dispatch.routes_to_sdpa).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lfi import _dispatch
from lfi._numerics import compute_dtype
from lfi.backends.torch import interaction_attention as reference
from lfi.ops import _double_backward as double_backward
from lfi.ops import _vmap
from lfi.ops._functorch import functorch_active, functorch_function
from lfi.ops._functorch import plain_eager as _plain_eager
from lfi.ops._functorch import requires_grad as _requires_grad
from lfi.ops._kl import check_dense_target, check_options, reduce_rows
from lfi.ops._validation import (
    check_enable_gqa,
    check_float,
    check_qkv,
    check_tensor,
    check_weights_rows,
    empty_dims,
    normalize_mask,
)

OP = "interaction_attention"


@torch.library.custom_op("lfi::interaction_attention_fwd", mutates_args=())
def interaction_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: float, is_causal: bool,
    weights_start: int, weights_stop: int, kl_target: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward on a concrete backend: out (B, H, M, Dv); stats (B, H, M, 2) float32 (float64 for
    float64 inputs): row max m and log l, so lse = m + log l (+inf on fully masked rows); weights
    (B, H, weights_stop - weights_start, N); and, with kl_target, per-row kl and tnorm (B, H, M)
    float32 (empty tensors without)."""
    return _forward_kernels(q, k, v, attn_mask, scale, is_causal, weights_start, weights_stop, kl_target, backend)


def _forward_kernels(q, k, v, attn_mask, scale, is_causal, weights_start, weights_stop, kl_target, backend,
                     need_stats=True):
    """The body of interaction_attention_fwd (also run directly in plain eager mode). With
    need_stats=False (no backward will run), a backend that declares STATS_OPTIONAL skips the row
    statistics; stats and tnorm are None then."""
    impl = _dispatch.implementation(backend, OP)
    if not need_stats and getattr(impl, "STATS_OPTIONAL", False):
        out, _, weights, kl, _ = impl.attention_forward(
            q, k, v, attn_mask, scale, is_causal, weights_start, weights_stop, kl_target, need_stats=False
        )
        return out, None, weights, kl, None
    out, stats, weights, kl, tnorm = impl.attention_forward(
        q, k, v, attn_mask, scale, is_causal, weights_start, weights_stop, kl_target
    )
    if kl is None:
        kl, tnorm = stats.new_empty(0), stats.new_empty(0)
    return out, stats, weights, kl, tnorm


@interaction_attention_fwd.register_fake
def _(q, k, v, attn_mask, scale, is_causal, weights_start, weights_stop, kl_target, backend):
    B, H, M, _ = q.shape
    stats = q.new_empty(B, H, M, 2, dtype=compute_dtype(q.dtype))
    kl_shape = (B, H, M) if kl_target is not None else (0,)
    maps_shape = (B, H, weights_stop - weights_start, k.shape[2])
    # A backend may pad the rows of its maps buffer (the Triton one does, for vectorized stores).
    map_strides = getattr(_dispatch.implementation(backend, OP), "map_strides", None)
    return (
        q.new_empty(B, H, M, v.shape[-1]),
        stats,
        q.new_empty_strided(maps_shape, map_strides(*maps_shape)) if map_strides else q.new_empty(maps_shape),
        stats.new_empty(kl_shape),
        stats.new_empty(kl_shape),
    )


@torch.library.custom_op("lfi::interaction_attention_bwd", mutates_args=())
def interaction_attention_bwd(
    grad_out: Optional[Tensor], grad_weights: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
    stats: Tensor, attn_mask: Optional[Tensor], scale: float, is_causal: bool, weights_start: int,
    weights_stop: int, mask_grad: bool, kl_target: Optional[Tensor], tnorm: Optional[Tensor],
    grad_kl: Optional[Tensor], backend: str, probs: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask); dmask has attn_mask's shape when mask_grad, else it is empty. grad_out None:
    no gradient reaches out (dV = 0, dP = G). probs: the forward's P when the backend asked to keep it
    (see _setup_context), else None (recomputed)."""
    return _backward_kernels(grad_out, grad_weights, q, k, v, out, stats, attn_mask, scale, is_causal,
                             weights_start, weights_stop, mask_grad, kl_target, tnorm, grad_kl, backend, probs)


def _backward_kernels(grad_out, grad_weights, q, k, v, out, stats, attn_mask, scale, is_causal,
                      weights_start, weights_stop, mask_grad, kl_target, tnorm, grad_kl, backend, probs=None):
    """The body of interaction_attention_bwd (also run directly by _EagerForward's backward)."""
    extra = {} if probs is None else {"probs": probs}
    dq, dk, dv, dmask = _dispatch.implementation(backend, OP).attention_backward(
        grad_out, grad_weights, q, k, v, out, stats, attn_mask, scale, is_causal,
        weights_start, weights_stop, mask_grad, kl_target, tnorm, grad_kl, **extra,
    )
    return dq, dk, dv, dmask if dmask is not None else q.new_empty(0)


@interaction_attention_bwd.register_fake
def _(grad_out, grad_weights, q, k, v, out, stats, attn_mask, scale, is_causal, weights_start, weights_stop,
      mask_grad, kl_target, tnorm, grad_kl, backend, probs=None):
    # Every backend returns contiguous gradients, whatever the inputs' strides.
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output, keep_out=True):
    """keep_out=False: out is not saved; _EagerPV holds it and hands it over (see _OutGradient)."""
    q, k, v, attn_mask, scale, is_causal, weights_start, weights_stop, kl_target, backend = inputs
    out, stats, weights, _, tnorm = output
    # A backend whose backward can read the returned maps instead of recomputing P says which
    # (the torch backend: maps of every row in its compute dtype, i.e. P itself, as eager keeps it).
    keep = getattr(_dispatch.implementation(backend, OP), "probs_to_keep", None)
    probs = keep(q, weights, weights_start, weights_stop) if keep is not None else None
    ctx.save_for_backward(q, k, v, out if keep_out else None, stats, attn_mask, kl_target, tnorm, probs)
    ctx.args = (scale, is_causal, weights_start, weights_stop)
    ctx.backend = backend
    ctx.mark_non_differentiable(stats, tnorm)
    # Unused outputs then arrive as None: no zero-filled map-sized gradient when maps are not used.
    ctx.set_materialize_grads(False)
    ctx.backward_op = torch.ops.lfi.interaction_attention_bwd


def _backward(ctx, grad_out, grad_stats, grad_weights, grad_kl, grad_tnorm):
    q, k, v, out, stats, attn_mask, kl_target, tnorm, probs = ctx.saved_tensors
    scale, is_causal, weights_start, weights_stop = ctx.args
    mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    if kl_target is None:
        grad_kl = None
    if out is None:  # out (and dO when no one sees dW) from _EagerPV's backward, see _OutGradient
        grad_out, out = ctx.out_gradient.take()
        if out is None:  # attention_pv kept it (or did not run): the backends read out's shape only
            out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    if torch.is_grad_enabled():
        # A differentiable backward is asked for (create_graph=True, gradgradcheck, torch.func):
        # the same gradients from differentiable torch ops (lfi.ops._double_backward), not the kernels.
        dq, dk, dv, dmask = double_backward.attention_backward(
            grad_out, grad_weights, q, k, v, attn_mask, scale, is_causal, weights_start, weights_stop, mask_grad,
            kl_target, grad_kl,
        )
        return dq, dk, dv, dmask, None, None, None, None, None, None
    # grad_out is None when only the maps or the KL enter the loss, and when every row's maps are
    # returned (out is then read through attention_pv) unless attention_pv passed dO on: the
    # backends then skip the dO products.
    dq, dk, dv, dmask = ctx.backward_op(
        grad_out, grad_weights, q, k, v, out, stats, attn_mask, scale, is_causal,
        weights_start, weights_stop, mask_grad, kl_target, tnorm if grad_kl is not None else None, grad_kl,
        ctx.backend, probs,
    )
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None, None


interaction_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


_vmap.register(interaction_attention_fwd, [_vmap.FULL] * 3 + [_vmap.BCAST] + [None] * 4 + [_vmap.BCAST, None])
_vmap.register(
    interaction_attention_bwd,
    [_vmap.FULL] * 7 + [_vmap.BCAST] + [None] * 5 + [_vmap.BCAST, _vmap.FULL, _vmap.FULL, None, _vmap.FULL],
    bcast_grads={3: 7},  # dmask has the (per-sample) mask's shape
)


# --------------------------------------------------------------------------------------------------
# attention_pv: out = W @ V on the autograd path, with the fused output as its value
# --------------------------------------------------------------------------------------------------
# When every row's maps are returned, the results are wired as eager attention's are (w = softmax(s),
# out = w @ v): out = attention_pv(w, v, out_fused), whose forward returns the fused kernel's output
# (no recompute) and whose backward is that of w @ v: dW = dO V^T, dV = W^T dO. The maps op then
# receives dW (+ the gradient of any loss on w) as the gradient of its maps, and no gradient of
# out_fused, so its backward (one dS pass) gives dq, dk: dS = W * (dW - rowsum(dW * W)). Hence
# w.retain_grad(), hooks on w and torch.autograd.grad(out, w) behave as in eager.


@torch.library.custom_op("lfi::attention_pv", mutates_args=())
def attention_pv(w: Tensor, v: Tensor, out: Tensor) -> Tensor:
    """out (B, H, M, Dv), already computed as w (B, H, M, N) @ v (B, Hkv, N, Dv) (grouped heads) by
    the fused forward; returned as a new tensor (a custom op may not return an input)."""
    return out.clone()


@attention_pv.register_fake
def _(w, v, out):
    return torch.empty_like(out)


def _pv_setup_context(ctx, inputs, output):
    w, v, _ = inputs
    ctx.save_for_backward(w, v)
    ctx.set_materialize_grads(False)


def _pv_backward(ctx, grad_out):
    """dW = dO V^T (B, H, M, N), dV = W^T dO (B, Hkv, N, Dv), as eager's backward of w @ v computes
    them: matrix products in w's dtype (16-bit inputs: float32 accumulation, one rounding of the
    result), the query heads of each kv head stacked into one product, so dV's sum over them is
    accumulated in float32 too, as the kernels do, and no float32 copy of a map-sized tensor is made.
    dW takes w's row stride (the Triton backend's maps have padded rows; its backward reads dW in
    that layout without a copy). Torch ops, so this backward is itself differentiable (double
    backward)."""
    w, v = ctx.saved_tensors[:2]
    if grad_out is None:
        return None, None, None
    B, H, M, N = w.shape
    hkv, dv_dim = v.shape[1], v.shape[-1]
    # (B, H, M, X) -> (B, Hkv, G*M, X): query head h = kv * G + g reads kv head kv
    do = grad_out.reshape(B, hkv, -1, dv_dim)
    dw = dv = None
    if ctx.needs_input_grad[0]:
        pad = max(w.stride(-2) - N, 0) if w.stride(-1) == 1 else 0
        v_rows = F.pad(v, (0, 0, 0, pad)) if pad else v  # zero keys: the padding columns of dW
        dw = torch.matmul(do, v_rows.transpose(-1, -2)).reshape(B, H, M, N + pad)[..., :N]
    if ctx.needs_input_grad[1]:
        dv = torch.matmul(w.reshape(B, hkv, -1, N).transpose(-1, -2), do)
    return dw, dv, None


attention_pv.register_autograd(_pv_backward, setup_context=_pv_setup_context)
_vmap.register(attention_pv, [_vmap.FULL] * 3)


class _EagerPV(torch.autograd.Function):
    """attention_pv without the dispatcher (plain eager mode, see _plain_eager), after an
    _EagerForward that left out to it (out_via_pv). Returns out itself as a new tensor object (an
    alias: no copy; in-place ops on it are allowed, as on eager's w @ v) and holds it for the maps
    op's backward, which reads it from here (see _OutGradient). Its backward hands dO over as well,
    instead of computing dW and dV, when no one can see dW. maps: the maps tensor the caller received
    (saved, so that its hooks can be read in the backward); sentinel: _SENTINEL."""

    @staticmethod
    def forward(ctx, w, v, out, link, maps, sentinel):
        ctx.save_for_backward(w, v, maps)  # maps shares w's storage: nothing more is kept
        ctx.set_materialize_grads(False)
        ctx.link, ctx.out = link, out
        alias = out.detach()  # shares out's version counter: in-place changes are seen (below)
        ctx.out_version = alias._version
        return alias

    @staticmethod
    def backward(ctx, grad_out):
        out, ctx.out = ctx.out, None  # one backward reads it (a retained graph's next ones do without)
        if out is not None and out._version == ctx.out_version and grad_out is not None and _maps_gradient_unseen(ctx):
            ctx.link.give(grad_out, out)  # dW and dV come from the maps op's kernels
            return None, None, None, None, None, None
        return (*_pv_backward(ctx, grad_out), None, None, None)


# --------------------------------------------------------------------------------------------------
# dO V^T fused into the maps op's backward when no one can see dW (plain eager)
# --------------------------------------------------------------------------------------------------
# Eager's graph makes dW = dO V^T a tensor, and with a loss on the maps too, autograd adds the two
# gradients into a third: two map-sized tensors at the backward's peak (three while the caller holds
# the maps' gradient) and their passes through memory. The maps op's kernels can instead take dO
# itself and add dO V^T to the maps' gradient tile by tile, as they do for maps that do not feed
# out; then the backward makes no map-sized tensor. That changes nothing a caller can observe
# unless dW itself is observed, which eager allows through: a hook or retain_grad() on the returned
# maps (read from the saved maps tensor, whose Python object and hooks live as long as it is
# saved), autograd.grad / backward(inputs=...) (the engine may be capturing dW: such a call does not
# run _SENTINEL's node, which a plain backward runs), a differentiable backward (create_graph) and
# compiled autograd. In each of those, and when out was changed in place (its values are no longer
# the forward's, which the fused backward reads), attention_pv's backward computes dW and dV as
# eager's does. Not seen: a pre-hook registered on the maps op's node itself
# (grad_fn.register_prehook) receives the loss's gradient on the maps without dO V^T.

_SENTINEL = torch.zeros(0, requires_grad=True)
# An input of every _EagerPV node (its gradient is None): the engine runs its node in a backward
# without `inputs` and not in one with them. Held here so that every node shares one accumulator.
_SENTINEL_NODE = torch.autograd.graph.get_gradient_edge(_SENTINEL).node


class _OutGradient:
    """out (B, H, M, Dv) and dO, from _EagerPV's backward to the maps op's backward in the same
    backward call (graph task; the engine runs attention_pv's node first: it consumes the maps op's
    outputs). Empty when attention_pv computed dW itself, or did not run (no loss on out)."""

    __slots__ = ("grad_out", "out", "task")

    def __init__(self):
        self.grad_out = self.out = None
        self.task = -1

    def give(self, grad_out: Tensor, out: Tensor) -> None:
        self.grad_out, self.out, self.task = grad_out, out, torch._C._current_graph_task_id()

    def take(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(dO, out), or (None, None) when nothing was handed over in this backward call."""
        taken = (self.grad_out, self.out) if self.task == torch._C._current_graph_task_id() else (None, None)
        self.grad_out = self.out = None
        self.task = -1
        return taken


def _maps_gradient_unseen(ctx) -> bool:
    """True when dW is observable by no one (see the comment above _SENTINEL)."""
    if torch.is_grad_enabled() or not ctx.needs_input_grad[0] or torch.compiler.is_compiling():
        return False
    maps = ctx.saved_tensors[2]
    if maps._backward_hooks or maps.retains_grad:
        return False
    return torch._C._will_engine_execute_node(_SENTINEL_NODE)


_FunctorchPV = functorch_function(
    torch.ops.lfi.attention_pv, _pv_setup_context, _pv_backward,
    "attention_pv with its autograd, for torch.func transforms (lfi.ops._functorch).")


def _pv(w, v, out, maps):
    """out on the autograd path of w and v (see attention_pv), by the route _attention_forward took.
    maps: the maps tensor returned to the caller (w, or w without its head dimension)."""
    link = getattr(out.grad_fn, "out_gradient", None) if _plain_eager(w, v, out) else None
    if link is not None:  # an _EagerForward left out to attention_pv (out_via_pv)
        return _EagerPV.apply(w, v, out, link, maps, _SENTINEL)
    if functorch_active():
        return _FunctorchPV.apply(w, v, out)
    return torch.ops.lfi.attention_pv(w, v, out)


class _EagerForward(torch.autograd.Function):
    """interaction_attention_fwd with its own autograd (_setup_context, _backward), minus the
    dispatcher: the custom ops' Python wrappers (argument defaults, alias checks, the backward's
    second op) cost ~50 us per forward + backward on this project's 2-core CPU, 5 % of a whole
    (8, 6, 16, 197, 64) cross-attention call. Used only where nothing needs the ops themselves
    (see _plain_eager); the kernels, the saved tensors and the gradients are the same, bit for bit
    (tests/test_sdpa_routing.py)."""

    @staticmethod
    def forward(ctx, *inputs):  # the old style: a separate setup_context costs an inspect.signature bind
        *inputs, out_via_pv = inputs  # last, so that ctx.needs_input_grad has the op's indices
        output = _forward_kernels(*inputs)
        _setup_context(ctx, inputs, output, keep_out=not out_via_pv)
        ctx.backward_op = _backward_kernels
        ctx.out_gradient = _OutGradient() if out_via_pv else None
        return output

    @staticmethod
    def backward(ctx, *grads):  # differentiable with grad mode on (double backward), see _backward
        return *_backward(ctx, *grads), None


_FunctorchForward = functorch_function(
    torch.ops.lfi.interaction_attention_fwd, _setup_context, _backward,
    "interaction_attention_fwd with its autograd, for torch.func transforms (lfi.ops._functorch).")


def _attention_forward(q, k, v, mask, scale, is_causal, w_start, w_stop, kl_target, backend, out_via_pv=False):
    """torch.ops.lfi.interaction_attention_fwd, or in plain eager mode the same kernels and autograd
    without the dispatcher (and without autograd at all when nothing requires grad). out_via_pv: out
    will be read through attention_pv (every row's maps on the autograd path)."""
    args = (q, k, v, mask, scale, is_causal, w_start, w_stop, kl_target, backend)
    if not _plain_eager(q, k, v, mask, kl_target):
        if functorch_active():
            return _FunctorchForward.apply(*args)
        return torch.ops.lfi.interaction_attention_fwd(*args)
    if _requires_grad(q, k, v, mask, kl_target):
        return _EagerForward.apply(*args, out_via_pv)
    return _forward_kernels(*args, need_stats=False)  # no backward will need the row statistics

_warned_dropout_fallback = False


def _warn_dropout_fallback(backend: str) -> None:
    global _warned_dropout_fallback
    if not _warned_dropout_fallback:
        _warned_dropout_fallback = True
        warnings.warn(
            f"interaction_attention: dropout_p > 0 is not fused in the {backend!r} backend; "
            "falling back to the eager PyTorch path (full attention matrix in memory). "
            "This warning is shown once.",
            UserWarning,
            stacklevel=4,  # the caller of interaction_attention (via _run)
        )


def _run(q, k, v, mask, scale, is_causal, dropout_p, need_weights, w_start, w_stop, kl_target, M, backend,
         out_via_pv=False):
    """The op on our kernels (or the eager dropout path): (out, weights, kl)."""
    name = _dispatch.resolve(backend, q.device)
    if dropout_p > 0.0:
        if name != "torch":
            _warn_dropout_fallback(name)
        out, weights, kl = reference.attention_with_dropout(
            q, k, v, mask, float(scale), bool(is_causal), float(dropout_p), w_start, w_stop, kl_target
        )
    else:
        rows = (w_start, w_stop)
        keep = getattr(_dispatch.implementation(name, OP), "keeps_maps_for_backward", None)
        if not need_weights and keep is not None and torch.is_grad_enabled() and keep(q, k, v, mask, kl_target):
            # The backend's backward is faster reading P than recomputing it, and P fits its memory
            # budget: ask for every row's maps (the backward keeps them, see _setup_context) and drop
            # them from the results.
            rows = (0, M)
        out, _, weights, kl, _ = _attention_forward(
            q, k, v, mask, float(scale), bool(is_causal), *rows, kl_target, name, out_via_pv
        )
    return out, weights, kl


def _empty_attention(q, k, v, scale, w_start, w_stop):
    """(out, weights, kl) when B, H, M or N is 0 (lfi.ops._validation.empty_dims): the math
    computed eagerly on the empty tensors, so the results keep their autograd connection to q, k
    and v (zero gradients), as SDPA's do. N = 0: softmax over no key is empty, P @ V is zeros."""
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:  # H == 0 here, or grouped heads with an empty B, M or N
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    cdt = compute_dtype(q.dtype)
    p = torch.softmax((q.to(cdt) @ k.to(cdt).transpose(-2, -1)) * scale, -1)
    out = (p @ v.to(cdt)).to(q.dtype)
    weights = p[:, :, w_start:w_stop].to(q.dtype)
    kl = p.sum(-1) * 0  # (B, H, M): no key -> no target mass -> 0, as for fully masked rows
    return out, weights, kl


def interaction_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: Optional[float] = None, *, need_weights: bool = False,
    average_attn_weights: bool = False, weights_rows=None, kl_target: Optional[Tensor] = None,
    kl_reduction: str = "batchmean", enable_gqa: Optional[bool] = None, backend: str = "auto",
):
    """Scaled dot-product attention, a drop-in for ``F.scaled_dot_product_attention`` that can also
    return the exact softmax maps, with gradients flowing through them.

    Args:
        q: (B, H, M, D) queries, or (B, M, D).
        k: (B, Hkv, N, D) keys with H % Hkv == 0 (grouped-query heads: q head h reads kv head
            h // (H // Hkv)), or (B, N, D).
        v: (B, Hkv, N, Dv) values, or (B, N, Dv). q, k, v share one floating dtype and device;
            any strides (e.g. slices of a packed qkv tensor).
        attn_mask: None, bool (True = attend) or floating (added to the scores), broadcastable to
            (B, H, M, N); read through strides, never expanded in memory. A float mask that
            requires grad receives its gradient.
        dropout_p: dropout on the probabilities before ``P @ V`` (the returned maps are taken
            before dropout). Calls routed to SDPA (below) apply it inside SDPA; otherwise it is
            not fused: runs the eager path (warning once on non-torch backends).
        is_causal: query i attends keys j <= i (top-left aligned, as in SDPA); may be combined with
            attn_mask.
        scale: score scale, default D ** -0.5.
        need_weights: also return the softmax probabilities P, in q's dtype.
        average_attn_weights: return the mean over heads, (B, M, N), instead of (B, H, M, N).
        weights_rows: (start, stop) or slice: return only query rows start..stop-1 of the maps,
            (B, H, stop - start, N); the other rows are never written.
        kl_target: teacher probabilities broadcastable to (B, H, M, N) (e.g. (B, 1, M, N)): also
            return KL(kl_target || P) per row, computed in the same pass over the keys. The target
            is restricted to the keys each row attends (mask, causal) and renormalised there; rows
            without target mass give 0. No gradient flows to the target. A negative probability
            raises ValueError on the CPU; on a GPU it is not checked (a check would synchronise)
            and gives that row's KL NaN (as F.kl_div).
        kl_reduction: "batchmean" (sum / B), "mean" (sum / (B*H*M) rows), "sum" or "none"
            (per row, (B, H, M)), as in attention_kl.
        enable_gqa: as in SDPA: True allows grouped-query heads (H % Hkv == 0); False requires
            H == Hkv and raises RuntimeError otherwise, as SDPA does. None (the default; SDPA's is
            False) allows grouped heads implicitly, as lfi always has (its integrations and existing
            callers pass unexpanded kv heads without the keyword); every call SDPA accepts gives
            the same result.
        backend: "auto", "torch", "triton" or "cuda" (see lfi._dispatch; LFI_BACKEND overrides
            "auto"). An explicit backend always runs our kernels.

    Autograd graphs:
        * every row's per-head maps with dropout_p > 0 (the eager dropout path): out =
          dropout(w) @ v from the returned w itself, as in eager.
        * every row's per-head maps (need_weights=True without weights_rows, average_attn_weights
          or dropout), with grad mode on: as eager's, w = softmax(s) and out = w @ v. The fused op
          returns (out_fused, w); out = attention_pv(w, v, out_fused) returns out_fused's values
          and has the backward of w @ v (dW = dO V^T, dV = W^T dO); the fused op's backward then
          takes dW plus the gradient of any loss on w and runs one dS pass for dq, dk. So
          w.retain_grad(), hooks on w and torch.autograd.grad(out, w) behave as in eager. Where no
          one can observe dW (eager mode, a backward without inputs= or create_graph, no hook or
          retain_grad on w, out unchanged), dO goes to the fused op's backward instead and no
          map-sized dW is made (see _OutGradient).
        * anything else (no maps, a row window, head-averaged maps): the maps are a side
          output; out does not depend on them, and they receive gradients only from losses on
          them (flowing into the same fused backward as out's).
        A backward run with grad mode on (create_graph=True, torch.func.grad / vjp) uses
        differentiable torch formulas (lfi.ops._double_backward), so it can be differentiated
        again; under functorch transforms the ops run through functorch-compatible
        autograd.Functions with vmap rules (lfi.ops._vmap).

    Routing to SDPA: with backend="auto" (and LFI_BACKEND unset or "auto"), on CPU or CUDA, a call
    that asks for no maps (need_weights=False) and no kl_target, with no attn_mask, is_causal only
    when M == N, and H != Hkv only where SDPA takes ``enable_gqa`` (torch >= 2.5), returns
    ``F.scaled_dot_product_attention(q, k, v, None, dropout_p, is_causal, scale=scale)`` (with
    ``enable_gqa=True`` when H != Hkv) on the inputs as given: bit-identical to calling SDPA
    directly, with SDPA's best kernel and its own autograd (dropout included). The inputs are
    checked as above first. The rule is ``lfi._dispatch.routes_to_sdpa``.

    Returns:
        out (B, H, M, Dv) in q's dtype; (out, weights) when need_weights; (out, kl) with a
        kl_target; (out, weights, kl) with both (kl in float32). A query row with no attended key
        gives zeros in out and weights (never NaN) and zero gradients. Empty inputs give what SDPA
        gives: B, H or M = 0 -> empty results; N = 0 (no key: every row fully masked) -> zeros
        (B, H, M, Dv), maps (B, H, R, 0), KL 0 (see lfi.ops._validation.empty_dims).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, (3, 4), "(B, H, L, D) or (B, L, D)")
    if not q.dim() == k.dim() == v.dim():
        raise ValueError(f"q, k and v must have the same number of dims, got {q.dim()}, {k.dim()}, {v.dim()}")
    three_d = q.dim() == 3
    q_in, k_in, v_in, scale_in = q, k, v, scale  # as given: what SDPA is called with when routed
    if three_d:
        # (B, L, E) inputs, as in SDPA: a 3-D mask or target is (B, M, N); give it the head dim.
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        if isinstance(attn_mask, Tensor) and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        if isinstance(kl_target, Tensor) and kl_target.dim() == 3:
            kl_target = kl_target.unsqueeze(1)
    check_qkv(q, k, v)
    B, H, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    check_enable_gqa(enable_gqa, H, Hkv)
    device = q.device
    mask = normalize_mask(attn_mask, B, H, M, N, q)
    scale = check_float("scale", scale, none_ok=True)
    if scale is None:
        scale = D ** -0.5
    dropout_p = check_float("dropout_p", dropout_p, unit_interval=True)
    if average_attn_weights and not need_weights:
        raise ValueError("average_attn_weights=True needs need_weights=True")
    w_start, w_stop = check_weights_rows(weights_rows, need_weights, M)
    if kl_target is not None:
        check_options("probs", 1.0, kl_reduction)
        kl_target = check_dense_target(kl_target, (B, H, M, N), q, "probs", validate=False)
    maps_on_path = False
    if empty_dims(q, k):  # what SDPA returns (see lfi.ops._validation.empty_dims); no kernel runs
        _dispatch.resolve(backend, device)  # a bad backend name still raises
        out, weights, kl = _empty_attention(q, k, v, scale, w_start, w_stop)
    elif _dispatch.routes_to_sdpa(
        backend, device, need_weights=need_weights, kl_target=kl_target is not None,
        attn_mask=mask is not None, is_causal=bool(is_causal), M=M, N=N, H=H, Hkv=Hkv,
    ):
        # Exactly F.scaled_dot_product_attention(q, k, v, None, dropout_p, is_causal, scale) as the
        # caller would call it (scale=None stays None; 3-D inputs stay 3-D); SDPA's own autograd.
        gqa = {"enable_gqa": True} if H != Hkv else {}
        return F.scaled_dot_product_attention(
            q_in, k_in, v_in, None, float(dropout_p), bool(is_causal),
            scale=None if scale_in is None else float(scale_in), **gqa
        )
    else:
        # Every row's maps, per head: out = W @ V on the autograd path, as in eager (attention_pv).
        maps_on_path = (need_weights and not average_attn_weights and (w_start, w_stop) == (0, M)
                        and dropout_p == 0.0 and _requires_grad(q, k, v, mask, kl_target))
        out, weights, kl = _run(q, k, v, mask, scale, is_causal, dropout_p, need_weights, w_start, w_stop,
                                kl_target, M, backend, maps_on_path)
    results = [out]
    if need_weights:
        if average_attn_weights:
            weights = weights.mean(1) if H else weights.sum(1)  # H = 0: zeros (B, M, N), not 0 / 0
        elif three_d:
            weights = weights.squeeze(1)
        if maps_on_path:  # the returned tensor itself feeds out (3-D: through the unsqueeze)
            results[0] = _pv(weights.unsqueeze(1) if three_d else weights, v, out, weights)
        results.append(weights)
    if three_d:
        results[0] = results[0].squeeze(1)
    if kl_target is not None:
        results.append(reduce_rows(kl.squeeze(1) if three_d else kl, kl_reduction, B))
    return results[0] if len(results) == 1 else tuple(results)
