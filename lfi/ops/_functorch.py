"""How the custom ops are called: directly in plain eager mode, through autograd.Functions under
torch.func transforms, or as the ops themselves everywhere else.

Plain eager mode (``plain_eager``): the ops' Python wrappers in torch's dispatcher (argument
defaults, alias checks, a second op for the backward) cost tens of microseconds per call on the host,
so there the kernels run from an autograd.Function with the ops' own setup_context and backward
(``eager_function``): the same kernels, saved tensors and gradients, bit for bit.

torch.library's register_autograd does not support functorch transforms (grad, vjp, vmap, jacrev,
...), so while one is active the ops run through a torch.autograd.Function of the form they need: a
forward without ctx, a separate setup_context, and a vmap rule. Each op builds its Function with
``functorch_function`` from the same setup_context and backward it registers with torch.library.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def plain_eager(*tensors) -> bool:
    """True when an op may skip its custom op: eager mode (not under torch.compile, export, jit
    tracing, functorch transforms, or a __torch_dispatch__ / __torch_function__ mode) on plain
    tensors (no tensor subclasses such as FakeTensor or DTensor; None allowed). Everywhere else the
    custom ops, with their fake kernels, are called. A dispatch mode that declares `observes_only =
    True` (lfi.benchmark.TensorMemory: it records the tensors ops create and changes nothing) leaves
    the call on the plain path, so that it measures what an unobserved call runs."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_function_stack() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack() and not all(
        getattr(mode, "observes_only", False) for mode in _get_current_dispatch_mode_stack()
    ):
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


def requires_grad(*tensors) -> bool:
    """Grad mode is on and one of the tensors (None allowed) requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call_op(args: tuple, tensors: tuple, op: Callable, functorch_fn: type, eager_fn: type,
            forward_kernels: Callable):
    """A forward custom op's outputs for `args` (`tensors`: those of them that are tensors or None),
    by the route the mode allows: in plain eager mode the kernels (through `eager_fn`, the op's
    eager_function, when autograd needs them), under functorch transforms `functorch_fn`, else `op`."""
    if not plain_eager(*tensors):
        return (functorch_fn.apply if functorch_active() else op)(*args)
    if requires_grad(*tensors):  # any input, as the custom op's autograd decides
        return eager_fn.apply(*args)
    return forward_kernels(*args)


def eager_function(forward_kernels: Callable, backward_kernels: Callable, setup_context: Callable,
                   backward: Callable, doc: str) -> type:
    """A torch.autograd.Function for plain eager mode: its forward runs `forward_kernels` (the body
    of the op's forward custom op) and `setup_context`, and sets ctx.backward_op to
    `backward_kernels` (the body of its backward custom op), which the op's `backward` calls instead
    of the backward custom op (setup_context sets ctx.backward_op to that op)."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):  # the old style: a separate setup_context costs an inspect.signature bind
            output = forward_kernels(*inputs)
            setup_context(ctx, inputs, output)
            ctx.backward_op = backward_kernels
            ctx.set_materialize_grads(False)  # no zero-filled gradients of the row statistics
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__doc__ = doc
    return Function


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
