"""Higher-order autograd and torch.func on the three ops, every backend of the matrix.

* double backward, in float64 (torch, and the cuda backend's CPU kernels): ``gradcheck`` +
  ``gradgradcheck``, plus the differentiable backward's first-order gradients against the fused
  kernels' (gradgradcheck alone cannot see a wrong differentiable backward: it differentiates that
  same backward numerically), for interaction_attention (out; out + maps, all rows, a row window,
  head-averaged; bool mask with a fully masked row + causal; a float mask that receives its
  gradient; grouped-query heads; the fused KL), attention_kl and attention_kl_qk (dense and
  implicit teachers). On every backend, Triton's float32 included, the second-order gradients are
  also compared with the float64 reference's (autograd through tests/reference.py).
* ``torch.func.grad`` / ``vjp`` / ``vmap`` (and vmap of grad: per-sample gradients) against plain
  autograd and a Python loop, on the eager path and through the custom ops directly.

Shapes are tiny: gradgradcheck perturbs every input element (and the Triton interpreter is slow).
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE
from helpers import backend_supports
from helpers import make_gen
from helpers import randn
from kl_cases import implicit_teacher
from kl_cases import make_target
from lfi.ops import attention_kl
from lfi.ops import attention_kl_qk
from lfi.ops import interaction_attention
from reference import ref_kl_qk_rows
from reference import ref_kl_rows
from reference import reference_attention
from reference import select_weights

B, H, HKV, M, N, D = 2, 2, 1, 3, 4, 3


def _qkv(gen, dtype, requires_grad=True):
    q = randn((B, H, M, D), gen, dtype, requires_grad=requires_grad)
    k = randn((B, HKV, N, D), gen, dtype, requires_grad=requires_grad)
    v = randn((B, HKV, N, D + 1), gen, dtype, requires_grad=requires_grad)
    return q, k, v


def _bool_mask(gen):
    mask = torch.rand(B, 1, M, N, generator=gen) < 0.7
    mask[:, :, :, 0] = True
    mask[0, 0, 1] = False  # a fully masked row: zeros and zero gradients
    return mask.to(DEVICE)


# Each case: (id, call(q, k, v, mask, target, backend) -> tuple of outputs, needs).
def _attn_cases():
    def out_only(q, k, v, extra, backend):
        return (interaction_attention(q, k, v, backend=backend),)

    def out_and_maps(q, k, v, extra, backend):
        return interaction_attention(q, k, v, need_weights=True, backend=backend)

    def maps_rows(q, k, v, extra, backend):
        return interaction_attention(q, k, v, need_weights=True, weights_rows=(1, 3), backend=backend)

    def maps_avg(q, k, v, extra, backend):
        return interaction_attention(q, k, v, need_weights=True, average_attn_weights=True, backend=backend)

    def bool_mask_causal(q, k, v, extra, backend):
        return interaction_attention(q, k, v, extra["bool"], is_causal=True, need_weights=True, backend=backend)

    def float_mask(q, k, v, extra, backend):
        return interaction_attention(q, k, v, extra["float"], scale=0.7, need_weights=True, backend=backend)

    def fused_kl(q, k, v, extra, backend):
        return interaction_attention(q, k, v, need_weights=True, kl_target=extra["target"], kl_reduction="none",
                                     backend=backend)

    return [("out", out_only), ("out+maps", out_and_maps), ("maps-rows", maps_rows), ("maps-avg", maps_avg),
            ("bool-mask-causal", bool_mask_causal), ("float-mask-grad", float_mask), ("fused-kl", fused_kl)]


ATTN_CASES = _attn_cases()


def _extra(gen, dtype):
    fmask = randn((1, H, M, N), gen, dtype, requires_grad=True)
    target = make_target((B, 1, M, N), "probs", gen, dtype=dtype)
    return {"bool": _bool_mask(gen), "float": fmask, "target": target}


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_attention_gradgradcheck(backend, case):
    name, call = case
    if not backend_supports(backend, torch.float64):
        pytest.skip(f"backend={backend!r} has no float64 kernels: test_attention_double_backward_values covers it")
    gen = make_gen("gradgrad", backend, name)
    q, k, v = _qkv(gen, torch.float64)
    extra = _extra(gen, torch.float64)
    inputs = (q, k, v) + ((extra["float"],) if name == "float-mask-grad" else ())

    def fn(q, k, v, *mask):
        if mask:
            extra["float"] = mask[0]
        return call(q, k, v, extra, backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    _same_first_order(fn(*inputs), inputs)


def _same_first_order(outs, inputs):
    """The differentiable backward (create_graph=True: lfi.ops._double_backward) gives the fused
    kernels' gradients. gradgradcheck alone cannot see a wrong differentiable backward: it
    differentiates that same backward numerically."""
    ups = [randn(o.shape, make_gen("same_first", i), torch.float64).to(o.dtype) for i, o in enumerate(outs)]
    fused = torch.autograd.grad(outs, inputs, ups, retain_graph=True)
    differentiable = torch.autograd.grad(outs, inputs, ups, create_graph=True)
    for f, d in zip(fused, differentiable):
        assert d.requires_grad
        torch.testing.assert_close(d, f, atol=1e-12, rtol=1e-10)


def _reference_outputs(name, q, k, v, extra):
    """The float64 reference of each case's outputs (differentiable: tests/reference.py)."""
    mask = {"bool-mask-causal": extra["bool"], "float-mask-grad": extra["float"]}.get(name)
    scale = 0.7 if name == "float-mask-grad" else None
    out, p = reference_attention(q, k, v, mask, is_causal=name == "bool-mask-causal", scale=scale)
    if name == "out":
        return (out,)
    if name == "maps-rows":
        return out, select_weights(p, (1, 3))
    if name == "maps-avg":
        return out, select_weights(p, None, True)
    if name == "fused-kl":
        t = extra["target"].double()
        log_p = torch.log(p)
        kl = torch.where(t > 0, t * (torch.log(t) - log_p), torch.zeros_like(p)).sum(-1)
        return out, p, kl
    return out, p


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_attention_double_backward_values(backend, case):
    """Second-order gradients of a float32 call (every backend, Triton included) against the
    float64 reference's: L2 = sum(r * dL/dinputs) with dL/dinputs from create_graph=True."""
    name, call = case
    gen = make_gen("double_backward_values", backend, name)
    q, k, v = _qkv(gen, torch.float32)
    extra = _extra(gen, torch.float32)
    inputs = [q, k, v] + ([extra["float"]] if name == "float-mask-grad" else [])

    def second_order(outs, ins):
        ups = [randn(o.shape, make_gen("up", i), torch.float64).to(o.dtype) for i, o in enumerate(outs)]
        first = torch.autograd.grad(outs, ins, ups, create_graph=True)
        rs = [randn(g.shape, make_gen("r", i), torch.float64).to(g.dtype) for i, g in enumerate(first)]
        return torch.autograd.grad(sum((g * r).sum() for g, r in zip(first, rs)), ins)

    got = second_order(call(q, k, v, extra, backend), inputs)
    ins64 = [t.detach().double().requires_grad_(True) for t in inputs]
    extra64 = dict(extra, target=extra["target"].double())
    if name == "float-mask-grad":
        extra64["float"] = ins64[3]
    want = second_order(_reference_outputs(name, *ins64[:3], extra64), ins64)
    for n, g, w in zip("qkvm", got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, atol=2e-4 * max(1.0, w.abs().max().item()), rtol=2e-4,
                                   msg=lambda m, n=n: f"d2 {n}: {m}")


# --------------------------------------------------------------------------------------------------
# attention_kl, attention_kl_qk
# --------------------------------------------------------------------------------------------------

KL_CASES = [("probs", None), ("logits", "key-mask"), ("log_probs", None)]


def _key_mask(gen):
    keep = torch.rand(B, 1, 1, N, generator=gen) < 0.7
    keep[..., 0] = True
    return keep.to(DEVICE)


def _second_order_tol(dtype):
    return dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)


def _kl_dtype(backend):
    return torch.float64 if backend_supports(backend, torch.float64) else torch.float32


@pytest.mark.parametrize("target_is,mask", KL_CASES, ids=[c[0] for c in KL_CASES])
def test_attention_kl_double_backward(backend, target_is, mask):
    gen = make_gen("kl_gradgrad", backend, target_is)
    dtype = _kl_dtype(backend)
    logits = randn((B, H, M, N), gen, dtype, requires_grad=True)
    target = make_target((B, 1, M, N), target_is, gen, dtype=dtype)
    key_mask = _key_mask(gen) if mask else None
    kw = dict(target_is=target_is, temperature=1.3, key_mask=key_mask, reduction="none")

    def fn(x):
        return attention_kl(x, target, backend=backend, **kw)

    if dtype == torch.float64:
        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)
        assert torch.autograd.gradgradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)
        _same_first_order((fn(logits),), (logits,))
    up, r = randn((B, H, M), gen, dtype), randn(logits.shape, gen, dtype)
    (g1,) = torch.autograd.grad(fn(logits), logits, up, create_graph=True)
    (got,) = torch.autograd.grad((g1 * r).sum(), logits)
    lg64 = logits.detach().double().requires_grad_(True)
    (w1,) = torch.autograd.grad(ref_kl_rows(lg64, target.double(), target_is, 1.3, key_mask), lg64, up.double(),
                                create_graph=True)
    (want,) = torch.autograd.grad((w1 * r.double()).sum(), lg64)
    torch.testing.assert_close(got.double(), want, **_second_order_tol(dtype))


@pytest.mark.parametrize("teacher", ["dense", "implicit"])
def test_attention_kl_qk_double_backward(backend, teacher):
    gen = make_gen("klqk_gradgrad", backend, teacher)
    dtype = _kl_dtype(backend)
    q, k, _ = _qkv(gen, dtype)
    key_mask = _key_mask(gen)
    if teacher == "dense":
        target, kw = make_target((B, 1, M, N), "logits", gen, dtype=dtype), dict(target_is="logits")
    else:
        target, kw = implicit_teacher(B, M, N, 5, gen, dtype), dict(scale_t=0.6)
    kw.update(temperature=0.8, key_mask=key_mask, scale=0.9)

    def fn(q, k):
        return attention_kl_qk(q, k, target, reduction="none", backend=backend, **kw)

    if dtype == torch.float64:
        assert torch.autograd.gradcheck(fn, (q, k), eps=1e-6, atol=1e-7, rtol=1e-5)
        assert torch.autograd.gradgradcheck(fn, (q, k), eps=1e-6, atol=1e-7, rtol=1e-5)
        _same_first_order((fn(q, k),), (q, k))
    up = randn((B, H, M), gen, dtype)
    rq, rk = randn(q.shape, gen, dtype), randn(k.shape, gen, dtype)
    g1 = torch.autograd.grad(fn(q, k), (q, k), up, create_graph=True)
    got = torch.autograd.grad((g1[0] * rq).sum() + (g1[1] * rk).sum(), (q, k))
    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q, k))
    t64 = tuple(t.double() for t in target) if teacher == "implicit" else target.double()
    w1 = torch.autograd.grad(ref_kl_qk_rows(q64, k64, t64, **kw), (q64, k64), up.double(), create_graph=True)
    want = torch.autograd.grad((w1[0] * rq.double()).sum() + (w1[1] * rk.double()).sum(), (q64, k64))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **_second_order_tol(dtype))


# --------------------------------------------------------------------------------------------------
# torch.func: grad, vjp, vmap, vmap(grad)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("maps", [False, True], ids=["out", "out+maps"])
def test_func_grad_vjp_vmap_attention(backend, maps):
    gen = make_gen("func", backend, maps)
    q, k, v = _qkv(gen, torch.float32, requires_grad=False)
    mask = randn((1, 1, M, N), gen, torch.float32)

    def f(q, k, v):
        res = interaction_attention(q, k, v, mask, need_weights=maps, backend=backend)
        return res if not maps else res[0] + 0.5 * res[1].sum(-1, keepdim=True)

    def loss(q, k, v):
        return (f(q, k, v) ** 2).sum()

    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    want = torch.autograd.grad(loss(qs, ks, vs), (qs, ks, vs))
    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)

    out, vjp_fn = torch.func.vjp(f, q, k, v)
    up = randn(out.shape, gen)
    want = torch.autograd.grad(f(qs, ks, vs), (qs, ks, vs), up)
    for g, w in zip(vjp_fn(up), want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)

    # vmap over a leading sample dim of q only (k, v shared), and over dim 1 of all three
    qb = randn((3, B, H, M, D), gen)
    got = torch.func.vmap(f, in_dims=(0, None, None))(qb, k, v)
    want = torch.stack([f(qb[i], k, v) for i in range(3)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    kb, vb = randn((B, 3, HKV, N, D), gen), randn((B, 3, HKV, N, D + 1), gen)
    got = torch.func.vmap(f, in_dims=(0, 1, 1))(qb, kb, vb)
    want = torch.stack([f(qb[i], kb[:, i], vb[:, i]) for i in range(3)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)

    # per-sample gradients: vmap(grad)
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None, None))(qb, k, v)
    want = torch.stack([torch.func.grad(loss)(qb[i], k, v) for i in range(3)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_func_transforms_kl_ops(backend):
    gen = make_gen("func_kl", backend)
    logits = randn((B, H, M, N), gen)
    target = make_target((B, 1, M, N), "probs", gen)
    key_mask = _key_mask(gen)
    q, k, _ = _qkv(gen, torch.float32, requires_grad=False)

    def kl(x):
        return attention_kl(x, target, key_mask=key_mask, backend=backend)

    def klqk(q, k):
        return attention_kl_qk(q, k, target, key_mask=key_mask, backend=backend)

    x = logits.clone().requires_grad_(True)
    torch.testing.assert_close(torch.func.grad(kl)(logits), torch.autograd.grad(kl(x), x)[0], atol=1e-6, rtol=1e-5)
    qs, ks = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    want = torch.autograd.grad(klqk(qs, ks), (qs, ks))
    for g, w in zip(torch.func.grad(klqk, argnums=(0, 1))(q, k), want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    _, vjp_fn = torch.func.vjp(klqk, q, k)
    for g, w in zip(vjp_fn(torch.tensor(1.0)), want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)

    xb = randn((3, B, H, M, N), gen)
    got = torch.func.vmap(kl)(xb)
    torch.testing.assert_close(got, torch.stack([kl(xb[i]) for i in range(3)]), atol=1e-6, rtol=1e-6)
    got = torch.func.vmap(torch.func.grad(kl))(xb)
    torch.testing.assert_close(got, torch.stack([torch.func.grad(kl)(xb[i]) for i in range(3)]), atol=1e-6, rtol=1e-6)
    qb = randn((3, B, H, M, D), gen)
    got = torch.func.vmap(klqk, in_dims=(0, None))(qb, k)
    torch.testing.assert_close(got, torch.stack([klqk(qb[i], k) for i in range(3)]), atol=1e-6, rtol=1e-6)


def test_func_on_custom_ops_directly(backend):
    """torch.vmap of the custom ops themselves uses their vmap rules (lfi.ops._vmap), one call on the
    folded batch; a broadcast mask that is vmapped, and the mask gradient of the backward op."""
    gen = make_gen("ops_vmap", backend)
    q, k, v = _qkv(gen, torch.float32, requires_grad=False)
    masks = randn((3, 1, H, M, N), gen)  # per-sample masks that broadcast over B
    fwd = torch.ops.lfi.interaction_attention_fwd

    def f(q, mask):
        return fwd(q, k, v, mask, 0.5, False, 0, M, None, backend)

    qb = randn((3, B, H, M, D), gen)
    got = torch.func.vmap(f)(qb, masks)
    for i in range(3):
        want = f(qb[i], masks[i])
        for g, w in zip(got[:3], want[:3]):
            torch.testing.assert_close(g[i], w, atol=1e-6, rtol=1e-6)

    out, stats, weights, _, _ = f(q, masks[0])
    go = randn((3,) + tuple(out.shape), gen)
    bwd = torch.ops.lfi.interaction_attention_bwd

    def b(go, mask):
        return bwd(go, None, q, k, v, out, stats, mask, 0.5, False, 0, 0, True, None, None, None, backend, None)

    got = torch.func.vmap(b, in_dims=(0, None))(go, masks[0])
    for i in range(3):
        for g, w in zip(got, b(go[i], masks[0])):
            torch.testing.assert_close(g[i], w, atol=1e-5, rtol=1e-5)


def test_hessian_by_jacrev_of_jacrev(backend):
    """A full Hessian through torch.func (reverse over reverse: vmap of a differentiable backward)
    equals eager autograd's on the reference formula. Forward-mode AD (torch.func.hessian = jacfwd
    of jacrev) is not implemented and says so."""
    dtype = _kl_dtype(backend)
    gen = make_gen("hessian", backend)
    q, k, v = (randn(s, gen, dtype) for s in ((1, 2, 2, 3), (1, 1, 3, 3), (1, 1, 3, 2)))

    def f(q):
        return interaction_attention(q, k, v, backend=backend).square().sum()

    got = torch.func.jacrev(torch.func.jacrev(f))(q)
    want = torch.autograd.functional.hessian(
        lambda q: reference_attention(q, k.double(), v.double())[0].square().sum(), q.double())
    torch.testing.assert_close(got.double(), want, **_second_order_tol(dtype))
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.hessian(f)(q)
