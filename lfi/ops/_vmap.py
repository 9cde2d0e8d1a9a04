"""vmap rules for the custom ops (torch.library.register_vmap): fold the vmapped dim into the batch dim.

Every tensor argument of lfi's ops has the batch B as its first dim, either fully ("full": q, k, v,
logits, gradients, row statistics) or possibly broadcast ("bcast": attn_mask, kl_target, target,
key_mask, with 1 or B there). Under ``torch.vmap`` with V samples, each argument becomes
(V * B, ...): a vmapped argument has its vmapped dim moved to the front and merged with B (a
broadcast B of 1 is expanded first); an argument that is not vmapped is repeated V times when it is
full (a copy: the kernels take one batch stride) and left as it is when it broadcasts. The op then
runs once, on the folded arguments, and its (V * B, ...) outputs are split back into (V, B, ...).
Without these rules torch.vmap runs the op once per sample (a slow fallback, with a warning).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FULL, BCAST = "full", "bcast"


def _placeholder(t: Tensor) -> bool:
    """The ops pass 1-D empty tensors where an optional output is absent (e.g. kl without kl_target)."""
    return t.dim() == 1 and t.numel() == 0


def _fold(t: Optional[Tensor], in_dim: Optional[int], kind: Optional[str], V: int, B: int, expand_bcast: bool):
    if kind is None or t is None or not isinstance(t, Tensor) or (in_dim is None and _placeholder(t)):
        return t
    if in_dim is None:
        if kind == BCAST and t.shape[0] == 1 and not expand_bcast:
            return t  # broadcasts over all V * B rows as it is
        t = t.unsqueeze(0)
    else:
        t = t.movedim(in_dim, 0)
    return t.expand(V, B, *t.shape[2:]).reshape(V * B, *t.shape[2:])


def _batch_size(args, in_dims, kinds) -> int:
    for a, d, kind in zip(args, in_dims, kinds):
        if kind == FULL and isinstance(a, Tensor) and not _placeholder(a):
            return a.shape[0] if d is None else a.movedim(d, 0).shape[1]
    raise AssertionError("no full tensor argument to read the batch size from")


def _unfold(t, V: int, B: int):
    if not isinstance(t, Tensor) or _placeholder(t):
        return t, None
    return t.unflatten(0, (V, B)), 0


def fold_call(op, kinds, info, in_dims, args, bcast_grads=None):
    """Runs `op` once on `args` folded as above (kinds: FULL / BCAST / None per argument) and returns
    (outputs, out_dims) for register_vmap. bcast_grads: {output index: argument index} for outputs
    that are gradients of a BCAST argument: they are computed on the argument expanded to V * B
    rows, and summed back to its per-sample batch size (1 or B)."""
    V = info.batch_size
    B = _batch_size(args, in_dims, kinds)
    expand = set((bcast_grads or {}).values())
    folded = [_fold(a, d, kind, V, B, i in expand) for i, (a, d, kind) in enumerate(zip(args, in_dims, kinds))]
    outputs = op(*folded)
    single = isinstance(outputs, Tensor)
    outs, dims = [], []
    for i, o in enumerate([outputs] if single else outputs):
        o, d = _unfold(o, V, B)
        arg = (bcast_grads or {}).get(i)
        if d is not None and arg is not None:
            src, src_dim = args[arg], in_dims[arg]
            per_sample_b = src.shape[0] if src_dim is None else src.movedim(src_dim, 0).shape[1]
            if per_sample_b == 1:
                o = o.sum(1, keepdim=True)
        outs.append(o)
        dims.append(d)
    return (outs[0], dims[0]) if single else (tuple(outs), tuple(dims))


def register(op, kinds, bcast_grads=None) -> None:
    """register_vmap(op) with the folding rule; kinds: FULL / BCAST / None per argument of op's schema."""

    def rule(info, in_dims, *args):
        return fold_call(op, kinds, info, in_dims, args, bcast_grads)

    torch.library.register_vmap(op, rule)
