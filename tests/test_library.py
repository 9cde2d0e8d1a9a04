"""The torch.library custom ops behind interaction_attention: opcheck (schema, fake/meta kernel,
autograd registration, AOT dispatch), direct calls (row stats, empty weights), and torch.compile;
every backend of the matrix (helpers.BACKEND_PARAMS)."""
from __future__ import annotations

import pytest
import torch

import lfi.ops  # noqa: F401  (registers torch.ops.lfi.*)
from helpers import DEVICE
from helpers import assert_close
from helpers import bool_mask
from helpers import detached64
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from helpers import schema_args
from lfi.ops import interaction_attention
from reference import reference_attention
from reference import reference_lse

OB, OH, OHKV, OM, ON, OD = 2, 2, 1, 9, 21, 16

OPCHECK_CASES = [
    dict(id="nomask_norows", mask=None, causal=False, rows=(0, 0)),
    dict(id="nomask_allrows", mask=None, causal=False, rows=(0, OM)),
    dict(id="floatmask_rows2-7", mask="float", causal=False, rows=(2, 7)),
    dict(id="floatmask_B11N_causal_norows", mask="float_key", causal=True, rows=(0, 0)),
    dict(id="boolmask_causal_rows0-4", mask="bool", causal=True, rows=(0, 4)),
]


def _op_args(case, backend, requires_grad=True):
    gen = make_gen("opcheck", case["id"], backend)
    q, k, v = make_qkv(OB, OH, OHKV, OM, ON, OD, gen=gen, requires_grad=requires_grad)
    mask = None
    if case["mask"] == "float":
        mask = float_mask((1, 1, OM, ON), gen).requires_grad_(requires_grad)
    elif case["mask"] == "float_key":
        mask = float_mask((OB, 1, 1, ON), gen)
    elif case["mask"] == "bool":
        mask = bool_mask((OB, OH, OM, ON), gen)
    scale = OD ** -0.5
    named = dict(q=q, k=k, v=v, attn_mask=mask, scale=scale, is_causal=case["causal"],
                 weights_start=case["rows"][0], weights_stop=case["rows"][1], backend=backend)
    return schema_args(torch.ops.lfi.interaction_attention_fwd.default, named)


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in OPCHECK_CASES])
def test_opcheck_fwd(backend, case):
    args = _op_args(case, backend)
    torch.library.opcheck(torch.ops.lfi.interaction_attention_fwd.default, args)


@pytest.mark.parametrize("layout", ["contiguous", "packed_qkv"])
def test_opcheck_bwd(backend, layout):
    """The backward op's fake kernel must describe what the real kernels return (sizes and
    strides), also for strided inputs such as q, k, v sliced out of a packed qkv projection:
    inductor asserts the strides of the fake outputs at run time."""
    gen = make_gen("opcheck_bwd", backend, layout)
    B, H, M, D = 2, 2, 9, 16
    if layout == "packed_qkv":
        q, k, v = torch.randn(B, M, 3, H, D, generator=gen).to(DEVICE).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = make_qkv(B, H, H, M, M, D, gen=gen)
    mask = float_mask((1, 1, M, M), gen)
    fwd = torch.ops.lfi.interaction_attention_fwd.default
    named = dict(q=q, k=k, v=v, attn_mask=mask, scale=D ** -0.5, is_causal=False, weights_start=2,
                 weights_stop=7, backend=backend)
    out, stats, weights = fwd(*schema_args(fwd, named))[:3]
    named.update(grad_out=torch.randn(out.shape, generator=gen).to(DEVICE),
                 grad_weights=torch.randn(weights.shape, generator=gen).to(DEVICE),
                 out=out, stats=stats, mask_grad=True)
    bwd = torch.ops.lfi.interaction_attention_bwd.default
    torch.library.opcheck(bwd, schema_args(bwd, named))


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in OPCHECK_CASES
                                  if c["id"] in ("nomask_norows", "boolmask_causal_rows0-4")])
def test_opcheck_bwd_cases(backend, case):
    """From the cuda backend's suite: the backward op's opcheck also without a mask and without map
    rows, and with a bool mask, causal masking and map rows; the forward's row statistics are
    (B, H, M, 2) float32."""
    fwd = torch.ops.lfi.interaction_attention_fwd.default
    args = _op_args(case, backend)
    named = dict(zip([a.name for a in fwd._schema.arguments], args))
    out, stats, weights = fwd(*args)[:3]
    assert stats.shape == (OB, OH, OM, 2) and stats.dtype == torch.float32
    gen = make_gen("opcheck_bwd_cases", case["id"], backend)
    mask = named["attn_mask"]
    named.update(grad_out=torch.randn(out.shape, generator=gen).to(DEVICE),
                 grad_weights=torch.randn(weights.shape, generator=gen).to(DEVICE) if weights.numel() else None,
                 out=out, stats=stats, mask_grad=mask is not None and mask.dtype != torch.bool)
    bwd = torch.ops.lfi.interaction_attention_bwd.default
    torch.library.opcheck(bwd, schema_args(bwd, {n: (t.detach() if isinstance(t, torch.Tensor) else t)
                                                 for n, t in named.items()}))


def test_bwd_without_grad_out(backend):
    """grad_out None (no gradient reaches out: losses on the maps or the KL only, and every row's maps
    returned, where out is read through attention_pv) gives exactly the gradients of a zero dL/dout
    (the kernels skip dV and dO V^T), and the op passes opcheck with it. GQA, a float mask's gradient."""
    gen = make_gen("bwd_without_grad_out", backend)
    B, H, M, N, D = 2, 2, 9, 11, 16
    q, k, v = make_qkv(B, H, 1, M, N, D, gen=gen)
    fwd = torch.ops.lfi.interaction_attention_fwd.default
    named = dict(q=q, k=k, v=v, attn_mask=float_mask((1, 1, M, N), gen), scale=D ** -0.5, is_causal=False,
                 weights_start=0, weights_stop=M, backend=backend)
    out, stats, weights = fwd(*schema_args(fwd, named))[:3]
    named.update(grad_weights=torch.randn(weights.shape, generator=gen).to(DEVICE), out=out, stats=stats,
                 mask_grad=True)
    bwd = torch.ops.lfi.interaction_attention_bwd.default
    got = bwd(*schema_args(bwd, {**named, "grad_out": None}))
    want = bwd(*schema_args(bwd, {**named, "grad_out": torch.zeros_like(out)}))
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert got[0].abs().sum() > 0 and not got[2].any()
    torch.library.opcheck(bwd, schema_args(bwd, {**named, "grad_out": None}))


@pytest.mark.parametrize("hooked", [True, False], ids=["hooked", "fused"])
def test_every_row_maps_pass_no_grad_out(monkeypatch, hooked):
    """With every row's maps returned, out is read through attention_pv. When it computes dW (here
    because a hook on the maps must see it), the maps op's backward hands the backend no dL/dout
    (not a zero tensor: two of its matrix products would be wasted); when no one sees dW, it hands
    the backend dO itself (and dV, dO V^T come from the backend)."""
    from lfi.backends.torch import interaction_attention as torch_backend

    seen = []
    backward = torch_backend.attention_backward

    def spy(grad_out, *args, **kwargs):
        seen.append(grad_out)
        return backward(grad_out, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "attention_backward", spy)
    gen = make_gen("every_row_maps_no_grad_out")
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8, gen=gen, requires_grad=True)
    out, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    if hooked:
        w.register_hook(lambda g: None)
    (out.square().sum() + w.square().sum()).backward()
    if hooked:
        assert seen == [None]
    else:
        assert len(seen) == 1 and torch.equal(seen[0], 2 * out.detach())
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in OPCHECK_CASES[:3]])
def test_op_direct_outputs(backend, case):
    """out, stats (float32 (row max, log row sum); lse = their sum is +inf on fully masked rows)
    and the weights slab from the raw op."""
    op = torch.ops.lfi.interaction_attention_fwd.default
    args = _op_args(case, backend, requires_grad=False)
    names = [a.name for a in op._schema.arguments]
    named = dict(zip(names, args))
    q, k, v, mask, scale, causal = (named[n] for n in ("q", "k", "v", "attn_mask", "scale", "is_causal"))
    w0, w1 = named["weights_start"], named["weights_stop"]
    if mask is not None:
        mask = mask.clone()
        mask[..., 4, :] = float("-inf")  # one fully masked row
        named["attn_mask"] = mask
    out, stats, weights = op(*(named[n] for n in names))[:3]
    assert stats.dtype == torch.float32 and stats.shape == (OB, OH, OM, 2)
    lse = stats.sum(-1)
    q64, k64, v64, m64 = detached64(q, k, v, mask)
    ref_out, ref_p = reference_attention(q64, k64, v64, m64, is_causal=causal, scale=scale)
    assert_close(out, ref_out, torch.float32, name="out")
    ref_lse = reference_lse(q64, k64, m64, is_causal=causal, scale=scale)
    inf = torch.isinf(ref_lse).cpu()
    assert (lse.cpu()[inf] == float("inf")).all(), "fully masked rows must have lse = +inf"
    torch.testing.assert_close(lse.cpu().double()[~inf], ref_lse.cpu()[~inf], atol=2e-5, rtol=2e-5)
    assert weights.shape == (OB, OH, w1 - w0, ON)
    assert weights.dtype == q.dtype
    if w1 > w0:
        assert_close(weights, ref_p[:, :, w0:w1], torch.float32, name="weights")
    else:
        assert weights.numel() == 0


class _TinyAttention(torch.nn.Module):
    """A timm-like attention block with a packed qkv projection; returns (x, maps of the last 4 rows)."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, mask):
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out, w = interaction_attention(q, k, v, mask, need_weights=True, weights_rows=(L - 4, L),
                                       backend="torch")
        return self.proj(out.transpose(1, 2).reshape(B, L, C)), w


def test_torch_compile_fullgraph_cpu():
    torch.manual_seed(0)
    model = _TinyAttention()
    x = torch.randn(2, 12, 32)
    mask = torch.randn(1, 1, 12, 12)
    ref_model = _TinyAttention()
    ref_model.load_state_dict(model.state_dict())

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    y, w = compiled(x, mask)
    y_ref, w_ref = ref_model(x, mask)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)

    r1, r2 = torch.randn_like(y), torch.randn_like(w)
    ((y * r1).sum() + (w * r2).sum()).backward()
    ((y_ref * r1).sum() + (w_ref * r2).sum()).backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_torch_compile_fullgraph_backend(backend):
    """From the cuda backend's suite: interaction_attention with an explicit backend inside a
    fullgraph-compiled function (opaque custom ops, fake kernels), maps of the last rows with a float
    mask; values and gradients as in eager mode."""
    gen = make_gen("compile_backend", backend)
    q, k, v = make_qkv(2, 2, 2, 12, 12, 16, gen=gen, requires_grad=True)
    mask = float_mask((1, 1, 12, 12), gen)

    def f(q, k, v):
        out, w = interaction_attention(q, k, v, mask, need_weights=True, weights_rows=(8, 12), backend=backend)
        return out.sum() + (w * w).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v)
    want = f(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(got, (q, k, v))
    g_ref = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
