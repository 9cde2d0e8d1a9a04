"""torch.func support of the custom ops: when to use it, and the autograd.Functions it needs.

torch.library's register_autograd does not support functorch transforms (grad, vjp, vmap, jacrev,
...), so while one is active the ops run through a torch.autograd.Function of the form they need: a
forward without ctx, a separate setup_context, and a vmap rule. Each op builds its Function with
``functorch_function`` from the same setup_context and backward it registers with torch.library.
"""
from __future__ import annotations

from typing import Callable

import torch


def functorch_active() -> bool:
    """A torch.func transform (grad, vjp, vmap, jacrev, ...) is active, outside torch.compile. The
    custom ops' own autograd (torch.library's register_autograd) does not support functorch, so the
    ops then go through autograd.Functions that do (a separate setup_context and a vmap rule)."""
    return bool(torch._C._are_functorch_transforms_active()) and not torch.compiler.is_compiling()


def functorch_function(op: Callable, setup_context: Callable, backward: Callable, doc: str) -> type:
    """A torch.autograd.Function whose forward calls `op` (a custom op: its own vmap rule, see
    lfi.ops._vmap, then runs it once on the folded batch) with the autograd of `setup_context` and
    `backward`. Under torch.func.grad / vjp the backward runs with grad mode on, so the ops' backwards
    take their differentiable route (lfi.ops._double_backward)."""

    class Function(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*inputs):
            return op(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__doc__ = doc
    return Function
