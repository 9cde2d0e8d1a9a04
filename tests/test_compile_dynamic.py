"""torch.compile(fullgraph=True, dynamic=True) of the three ops and of a patched timm ViT.

Each compiled function is called on several shapes (batch, query and key lengths all change): the
first call compiles (fullgraph: no graph break) and the later ones must not recompile
(torch._dynamo.testing.CompileCounterWithBackend on inductor), with outputs and gradients equal to
the eager call's. The first call may count 2 compiles: dynamo traces Python float arguments (and
defaults such as dropout_p=0.0) as symbolic floats, and restarts once, specialized, when they
are compared (the argument checks, `dropout_p > 0`). Sizes are chosen pairwise
distinct and > 1: dynamo specializes sizes 0 and 1 and ties sizes that happen to be equal ("duck
sizing"), recompiling for reasons that are not lfi's.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from helpers import DEVICE
from helpers import make_gen
from helpers import randn
from kl_cases import make_target
from lfi.ops import attention_kl
from lfi.ops import attention_kl_qk
from lfi.ops import interaction_attention

# (B, M, N) per call; H = 4, Hkv = 2... would tie Hkv with B = 2, so H = 6, Hkv = 3 and B in {2, 4, 5}
SHAPES = [(2, 5, 7), (4, 9, 11), (5, 13, 10)]
H, HKV, D = 6, 3, 8


def _compiled(fn):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    return torch.compile(fn, fullgraph=True, dynamic=True, backend=counter), counter


def _check_same(fn, compiled, make_inputs, grad_inputs, counter):
    """Runs SHAPES; returns how many compiles the calls after the first one added."""
    # One eager call first: the cuda backend loads its extension on first use, and dynamo guards on
    # the loader's state (lfi.backends.cuda._ext.unusable_reason), so a compile before that load
    # recompiles once after it.
    fn(*make_inputs(len(SHAPES), *SHAPES[0]))
    first = None
    for i, shape in enumerate(SHAPES):
        inputs = make_inputs(i, *shape)
        got, want = compiled(*inputs), fn(*inputs)
        got = (got,) if isinstance(got, torch.Tensor) else got
        want = (want,) if isinstance(want, torch.Tensor) else want
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        ins = [inputs[j] for j in grad_inputs]
        g_got = torch.autograd.grad(sum((g * g).sum() for g in got), ins)
        g_want = torch.autograd.grad(sum((w * w).sum() for w in want), ins)
        for g, w in zip(g_got, g_want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        first = counter.frame_count if first is None else first
    assert first >= 1, "the function was not compiled"
    return counter.frame_count - first


@pytest.mark.parametrize("variant", ["out-scale", "maps-mask", "rows-causal-kl"])
def test_compile_interaction_attention(backend, variant):
    """out only with an explicit scale (used to fail at math.isfinite(scale)); every row's maps
    with a float mask (the maps op + attention_pv); a row window, causal and the fused KL."""
    def fn(q, k, v, mask, target):
        if variant == "out-scale":
            return interaction_attention(q, k, v, scale=0.3, backend=backend)
        if variant == "maps-mask":
            return interaction_attention(q, k, v, mask, need_weights=True, backend=backend)
        return interaction_attention(q, k, v, is_causal=True, need_weights=True, weights_rows=(1, 4),
                                     kl_target=target, backend=backend)

    def make_inputs(i, B, M, N):
        gen = make_gen("compile", backend, variant, i)
        q = randn((B, H, M, D), gen, requires_grad=True)
        k = randn((B, HKV, N, D), gen, requires_grad=True)
        v = randn((B, HKV, N, D), gen, requires_grad=True)
        return q, k, v, randn((B, 1, M, N), gen), make_target((B, 1, M, N), "probs", gen)

    compiled, counter = _compiled(fn)
    assert _check_same(fn, compiled, make_inputs, (0, 1, 2), counter) == 0, "recompiled for a new shape"


def test_compile_kl_ops(backend):
    def fn(logits, q, k, target):
        return (attention_kl(logits, target, temperature=1.5, backend=backend),
                attention_kl_qk(q, k, target, scale=0.4, reduction="none", backend=backend))

    def make_inputs(i, B, M, N):
        gen = make_gen("compile_kl", backend, i)
        return (randn((B, H, M, N), gen, requires_grad=True), randn((B, H, M, D), gen, requires_grad=True),
                randn((B, HKV, N, D), gen, requires_grad=True), make_target((B, 1, M, N), "probs", gen))

    compiled, counter = _compiled(fn)
    assert _check_same(fn, compiled, make_inputs, (0, 1, 2), counter) == 0, "recompiled for a new shape"


def test_compile_enable_gqa_false_raises_like_sdpa():
    """enable_gqa=False with H != Hkv fails at trace time too, with the same error as eager."""
    gen = make_gen("compile_gqa")
    q, k = randn((2, H, 5, D), gen), randn((2, HKV, 7, D), gen)
    compiled, _ = _compiled(lambda q, k: interaction_attention(q, k, k, enable_gqa=False, backend="torch"))
    with pytest.raises(Exception, match="enable_gqa=False"):
        compiled(q, k)


def test_compile_patched_timm_vit(backend):
    """A patched tiny ViT (img 32, patch 8, depth 1, dim 64; lfi's path forced by an explicit
    backend), compiled from its token sequence to its logits (blocks, norm, head) over batch sizes
    and sequence lengths together: once. (timm's patch embedding specializes the image size, with
    or without lfi, so the lengths are varied on the tokens.)"""
    timm = pytest.importorskip("timm")
    import lfi.integrations.timm as lfi_timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=64, num_heads=2, num_classes=5).to(DEVICE)
    report = lfi_timm.patch(model, backend=backend, warn=False)
    assert len(report.patched) == 1, report.summary()

    def vit(tokens):
        return model.forward_head(model.norm(model.blocks(tokens)))

    params = [p for m in (model.blocks, model.norm, model.head) for p in m.parameters()]
    compiled, counter = _compiled(vit)
    vit(randn((2, 17, 64), make_gen("vit-warmup")))  # loads the backend first (see _check_same)
    first = None
    for B, L in ((2, 17), (3, 26), (4, 37)):
        x = randn((B, L, 64), make_gen("vit", backend, B, L), requires_grad=True)
        got, want = compiled(x), vit(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        g_got = torch.autograd.grad(got.square().sum(), [x] + params)
        g_want = torch.autograd.grad(want.square().sum(), [x] + params)
        for g, w in zip(g_got, g_want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        first = counter.frame_count if first is None else first
    assert counter.frame_count == first >= 1, "recompiled for a new batch size or sequence length"
