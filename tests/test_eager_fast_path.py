"""Our kernels called in plain eager mode (issue 10, part 5): interaction_attention, attention_kl and
attention_kl_qk run the kernels directly, without custom-op dispatcher round trips, with the custom
ops' own autograd, and give bit for bit what the custom ops torch.ops.lfi.* give (outputs and
gradients, with and without autograd); under a dispatch mode (as in tracing) the custom ops run.
"""
from __future__ import annotations

import sys

import pytest
import torch

from helpers import DEVICE
from helpers import make_gen
from helpers import make_qkv
from helpers import randn
from lfi.ops import interaction_attention

OPS_MODULE = sys.modules["lfi.ops.interaction_attention"]


def _qkv(B=2, H=2, Hkv=2, M=9, N=9, D=16, *, seed="qkv", requires_grad=False, dtype=torch.float32):
    return make_qkv(B, H, Hkv, M, N, D, gen=make_gen("sdpa_routing", seed), requires_grad=requires_grad,
                    dtype=dtype)


def _mask(kind, M, N):
    g = make_gen("mask", kind)
    if kind == "bool":
        return (torch.rand(M, N, generator=g) < 0.8).to(DEVICE)
    return torch.randn(1, 1, M, N, generator=g).to(DEVICE)


# --------------------------------------------------------------------------------------------------
# Our kernels in eager mode: called directly (no custom-op dispatcher round trips), with the custom
# ops' own autograd; bit-identical to calling them through torch.ops.lfi
# --------------------------------------------------------------------------------------------------

def _through_custom_ops(monkeypatch):
    monkeypatch.setattr(OPS_MODULE, "_plain_eager", lambda *tensors: False)


EAGER_CASES = {
    "plain": (dict(M=7, N=13), dict(need_weights=True)),
    "rows_avg": (dict(M=9, N=9), dict(need_weights=True, weights_rows=(2, 6), average_attn_weights=True)),
    "bool_mask_causal": (dict(M=9, N=9), dict(need_weights=True, attn_mask="bool", is_causal=True)),
    "float_mask_grad": (dict(M=9, N=9), dict(attn_mask="float_grad")),
    "gqa_out_only": (dict(H=4, Hkv=2, M=5, N=11), dict()),
    "kl": (dict(M=5, N=13), dict(kl_target=True, need_weights=True)),
    "fp16": (dict(M=6, N=10, dtype=torch.float16), dict(need_weights=True)),
}


def _run(q, k, v, kw, gen_seed):
    kw = dict(kw)
    mask = kw.pop("attn_mask", None)
    if mask == "bool":
        mask = _mask("bool", q.shape[2], k.shape[2])
    elif mask == "float_grad":
        mask = _mask("float", q.shape[2], k.shape[2]).requires_grad_()
    if kw.pop("kl_target", False):
        kw.update(kl_target=torch.softmax(randn((q.shape[0], 1, q.shape[2], k.shape[2]), make_gen("t")), -1),
                  kl_reduction="none")
    res = interaction_attention(q, k, v, mask, backend="torch", **kw)
    res = res if isinstance(res, tuple) else (res,)
    g = make_gen("eager_grads", gen_seed)
    loss = sum((r.float() * randn(r.shape, g)).sum() for r in res)
    leaves = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    return [r.detach() for r in res] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("case", list(EAGER_CASES))
def test_eager_path_bit_identical_to_custom_ops(monkeypatch, case):
    """Outputs and gradients; and without autograd (the eager path then skips the row statistics)."""
    shape, kw = EAGER_CASES[case]
    q, k, v = _qkv(seed=("eager", case), requires_grad=True, **shape)
    direct = _run(q, k, v, kw, case)
    with torch.no_grad():
        direct_no_grad = _run_no_grad(q, k, v, kw)
    _through_custom_ops(monkeypatch)
    via_ops = _run(q, k, v, kw, case)
    with torch.no_grad():
        via_ops_no_grad = _run_no_grad(q, k, v, kw)
    pairs = ((direct, via_ops), (direct_no_grad, via_ops_no_grad), (direct_no_grad, via_ops[:len(direct_no_grad)]))
    for got, want in pairs:
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _run_no_grad(q, k, v, kw):
    kw = dict(kw)
    mask = kw.pop("attn_mask", None)
    if mask is not None:
        mask = _mask("bool" if mask == "bool" else "float", q.shape[2], k.shape[2])
    if kw.pop("kl_target", False):
        kw.update(kl_target=torch.softmax(randn((q.shape[0], 1, q.shape[2], k.shape[2]), make_gen("t")), -1),
                  kl_reduction="none")
    res = interaction_attention(q, k, v, mask, backend="torch", **kw)
    return list(res) if isinstance(res, tuple) else [res]


def test_eager_path_skips_the_custom_op_only_in_plain_eager_mode(monkeypatch):
    """Plain eager calls run the kernels without torch.ops.lfi.interaction_attention_fwd; under a
    dispatch mode (as in tracing) or with tensor subclasses the custom op runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv(requires_grad=True)
    # torch resolves the custom op's redispatch target by attribute lookup on first use under a
    # dispatch mode and caches it; resolve it before the attribute is patched below (otherwise this
    # test passed only after some earlier test in the same process had done so).
    with Passthrough():
        interaction_attention(q, k, v, need_weights=True, backend="torch")

    seen = []
    real = torch.ops.lfi.interaction_attention_fwd

    def op(*args):
        seen.append("custom_op")
        return real(*args)

    monkeypatch.setattr(torch.ops.lfi, "interaction_attention_fwd", op)

    out, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    (out.sum() + w.sum()).backward()
    with torch.no_grad():
        interaction_attention(q, k, v, need_weights=True, backend="torch")
    assert seen == []
    with Passthrough():
        interaction_attention(q, k, v, need_weights=True, backend="torch")
    assert seen == ["custom_op"]


def test_eager_path_autograd_flags():
    q, k, v = _qkv(requires_grad=True)
    with torch.no_grad():
        out, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    assert not out.requires_grad and not w.requires_grad
    out, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    assert out.requires_grad and w.requires_grad
    qd, kd, vd = (t.detach() for t in (q, k, v))
    out, w = interaction_attention(qd, kd, vd, need_weights=True, backend="torch")
    assert not out.requires_grad and not w.requires_grad
    # only the maps enter the loss: out's gradient arrives as None and is treated as zero
    gq, = torch.autograd.grad(interaction_attention(q, k, v, need_weights=True, backend="torch")[1].sum(), q)
    assert torch.isfinite(gq).all()


# --------------------------------------------------------------------------------------------------
# The KL ops likewise (attention_kl, attention_kl_qk: InteractionLoss calls one per supervised layer)
# --------------------------------------------------------------------------------------------------

KL_CASES = {
    "kl_probs_mask": ("attention_kl", dict(target_is="probs", key_mask=True)),
    "kl_logits_T2": ("attention_kl", dict(target_is="logits", temperature=2.0)),
    "kl_qk_probs_gqa": ("attention_kl_qk", dict(target_is="probs", Hkv=1)),
    "kl_qk_implicit_mask": ("attention_kl_qk", dict(implicit=True, key_mask=True)),
}


def _kl_call(op, kw, *, grad):
    """The op's per-row KL on fixed inputs, and with grad the gradients of a weighted sum of it."""
    import lfi.ops

    kw = dict(kw)
    B, H, M, N, D = 2, 2, 5, 11, 8
    gen = make_gen("eager_kl", op, tuple(kw.items()))
    key_mask = (torch.rand(B, 1, 1, N, generator=gen) < 0.7).to(DEVICE) if kw.pop("key_mask", False) else None
    target = torch.softmax(randn((B, 1, M, N), gen), -1)
    if kw.get("target_is") == "logits":
        target = randn((B, 1, M, N), gen)
    if op == "attention_kl":
        leaves = [randn((B, H, M, N), gen, requires_grad=grad)]
        kl = lfi.ops.attention_kl(leaves[0], target, key_mask=key_mask, reduction="none", backend="torch", **kw)
    else:
        leaves = [randn((B, H, M, D), gen, requires_grad=grad), randn((B, kw.pop("Hkv", H), N, D), gen,
                                                                     requires_grad=grad)]
        if kw.pop("implicit", False):
            target = (randn((B, 1, M, 4), gen), randn((B, 1, N, 4), gen))
        kl = lfi.ops.attention_kl_qk(*leaves, target, key_mask=key_mask, reduction="none", backend="torch", **kw)
    if not grad:
        return [kl]
    return [kl.detach(), *torch.autograd.grad((kl * randn(kl.shape, gen)).sum(), leaves)]


@pytest.mark.parametrize("case", list(KL_CASES))
def test_kl_eager_path_bit_identical_to_custom_ops(monkeypatch, case):
    op, kw = KL_CASES[case]
    direct = _kl_call(op, kw, grad=True)
    with torch.no_grad():
        direct_no_grad = _kl_call(op, kw, grad=False)
    monkeypatch.setattr(sys.modules["lfi.ops._functorch"], "plain_eager", lambda *tensors: False)
    via_ops = _kl_call(op, kw, grad=True)
    for got, want in ((direct, via_ops), (direct_no_grad, via_ops[:1])):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("op", ["attention_kl", "attention_kl_qk"])
def test_kl_eager_path_skips_the_custom_ops_only_in_plain_eager_mode(monkeypatch, op):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    kw = dict(KL_CASES["kl_probs_mask" if op == "attention_kl" else "kl_qk_probs_gqa"][1])
    with Passthrough():  # resolves the ops' redispatch targets before they are patched (see above)
        _kl_call(op, kw, grad=True)
    seen = []
    for name in (f"{op}_fwd", f"{op}_bwd"):
        real = getattr(torch.ops.lfi, name)
        monkeypatch.setattr(torch.ops.lfi, name,
                            lambda *args, _real=real, _name=name: seen.append(_name) or _real(*args))
    _kl_call(op, kw, grad=True)
    with torch.no_grad():
        _kl_call(op, kw, grad=False)
    assert seen == []
    with Passthrough():
        _kl_call(op, kw, grad=True)
    assert seen == [f"{op}_fwd", f"{op}_bwd"]


@pytest.mark.parametrize("op", ["attention_kl", "attention_kl_qk"])
def test_kl_eager_path_grad_flags_match_custom_ops(monkeypatch, op):
    """A target that requires grad (a teacher not detached) with a frozen student: kl requires grad
    as it does through the custom op, and its backward leaves the target without a gradient."""
    import lfi.ops

    gen = make_gen("eager_kl_flags", op)
    target = torch.softmax(randn((2, 1, 3, 7), gen), -1).requires_grad_()
    student = (randn((2, 2, 3, 7), gen),) if op == "attention_kl" else (randn((2, 2, 3, 4), gen),
                                                                         randn((2, 2, 7, 4), gen))
    flags = []
    for route in ("plain", "custom_op"):
        if route == "custom_op":
            monkeypatch.setattr(sys.modules["lfi.ops._functorch"], "plain_eager", lambda *tensors: False)
        kl = getattr(lfi.ops, op)(*student, target, backend="torch")
        flags.append(kl.requires_grad)
        kl.backward()
        assert target.grad is None
    assert flags == [True, True]
