"""interaction_attention's maps against the float64 reference (tests/reference.py): need_weights,
average_attn_weights and weights_rows (tuple or slice), with losses on the output, the maps or both,
with masks and causal masking; and the autograd graph of the maps (every row's maps feed out, as in
eager: retain_grad, hooks). Every backend of the matrix (helpers.BACKEND_PARAMS).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from helpers import DEVICE
from helpers import assert_close
from helpers import backend_param
from helpers import backend_supports
from helpers import bool_mask
from helpers import case_params
from helpers import detached64
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from helpers import randn
from helpers import run_and_compare
from lfi import benchmark as bench
from lfi.ops import interaction_attention
from reference import reference_attention

# --------------------------------------------------------------------------------------------------
# need_weights / average_attn_weights / weights_rows, losses on out, weights or both
# --------------------------------------------------------------------------------------------------

WB, WH, WHKV, WM, WN = 1, 4, 2, 37, 45
ROWS = [None, (0, 1), (3, 21), (16, 32), (WM - 1, WM), (0, WM)]


def _rows_id(r):
    return "all" if r is None else f"{r[0]}-{r[1]}"


@pytest.mark.parametrize("average", [False, True], ids=["heads", "avg"])
@pytest.mark.parametrize("rows", ROWS, ids=_rows_id)
def test_weights_options(backend, rows, average):
    gen = make_gen("weights_options", backend, rows, average)
    q, k, v = make_qkv(WB, WH, WHKV, WM, WN, 32, gen=gen, requires_grad=True)
    out, w, _ = run_and_compare(backend, q, k, v, need_weights=True, average=average, rows=rows, gen=gen)
    n_rows = WM if rows is None else rows[1] - rows[0]
    assert w.shape == ((WB, n_rows, WN) if average else (WB, WH, n_rows, WN))


LOSS_MAPS = [
    (None, False), ((3, 21), False),
    # from the cuda backend's suite: the last row alone; averaged maps of a row window
    ((WM - 1, WM), False), ((0, 1), True), ((16, 32), True),
]


@pytest.mark.parametrize("loss", ["out", "weights", "both"])
@pytest.mark.parametrize("rows,average", LOSS_MAPS,
                         ids=[_rows_id(r) + ("-avg" if a else "") for r, a in LOSS_MAPS])
def test_loss_on_out_or_weights(backend, rows, average, loss):
    gen = make_gen("loss_modes", backend, rows, "avg", loss) if average else make_gen("loss_modes", backend, rows,
                                                                                      loss)
    q, k, v = make_qkv(WB, WH, WHKV, WM, WN, 32, gen=gen, requires_grad=True)
    run_and_compare(backend, q, k, v, need_weights=True, average=average, rows=rows, loss=loss, gen=gen)


def test_weights_options_with_masks_and_causal(backend):
    """weights_rows + averaging with a float mask, causal masking and a fully masked row."""
    gen = make_gen("weights_masks", backend)
    B, H, M, N = 2, 2, 30, 26
    q, k, v = make_qkv(B, H, 1, M, N, 24, gen=gen, requires_grad=True)
    mask = float_mask((B, 1, M, N), gen)
    mask[0, 0, 20] = float("-inf")
    for average in (False, True):
        run_and_compare(backend, q, k, v, mask, is_causal=True, need_weights=True, average=average,
                        rows=(14, 27), gen=gen)


def test_weights_slice_form(backend):
    """weights_rows also accepts a slice (lfi extension), with Python's negative-index semantics."""
    gen = make_gen("slice", backend)
    q, k, v = make_qkv(1, 2, 2, 10, 12, 16, gen=gen)
    _, w_tuple = interaction_attention(q, k, v, need_weights=True, weights_rows=(2, 7), backend=backend)
    _, w_slice = interaction_attention(q, k, v, need_weights=True, weights_rows=slice(2, 7), backend=backend)
    torch.testing.assert_close(w_slice, w_tuple, atol=0, rtol=0)
    _, w_neg = interaction_attention(q, k, v, need_weights=True, weights_rows=slice(-8, -3), backend=backend)
    torch.testing.assert_close(w_neg, w_tuple, atol=0, rtol=0)
    _, w_tail = interaction_attention(q, k, v, need_weights=True, weights_rows=slice(-4, None), backend=backend)
    _, w_all = interaction_attention(q, k, v, need_weights=True, backend=backend)
    torch.testing.assert_close(w_tail, w_all[:, :, -4:], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# The maps on the autograd path (issue 14): with every row's maps per head, out = W @ V as in eager
# --------------------------------------------------------------------------------------------------

def _dtype_for(backend):
    return torch.float64 if backend_supports(backend, torch.float64) else torch.float32


def _tol(dtype):
    return dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)


GRAPH_CASES = [
    dict(id="gqa", B=2, H=4, Hkv=2, M=7, N=9, mask=False, causal=False),
    dict(id="mask-causal-dead-row", B=1, H=2, Hkv=1, M=6, N=5, mask=True, causal=True),
    dict(id="M1", B=1, H=2, Hkv=2, M=1, N=11, mask=False, causal=False),
]


@pytest.mark.parametrize("case", case_params(GRAPH_CASES))
def test_full_maps_feed_out_as_in_eager(backend, case):
    """need_weights=True (all rows, per head): w.retain_grad() and a hook on w see dL/dw after a
    backward from out alone and from out + a loss on w; the grads of q, k, v, w equal eager's
    (w = softmax(s), out = w @ v, tests/reference.py) in float64 where the backend has it."""
    dtype = _dtype_for(backend)
    gen = make_gen("maps_graph", backend, case["id"])
    B, H, Hkv, M, N = case["B"], case["H"], case["Hkv"], case["M"], case["N"]
    q, k, v = make_qkv(B, H, Hkv, M, N, 8, dtype=dtype, gen=gen, requires_grad=True)
    mask = None
    if case["mask"]:
        mask = bool_mask((B, 1, M, N), gen)
        mask[0, 0, 2] = False  # a row with no attended key: zero maps, zero gradients
    r_out = randn((B, H, M, 8), gen, dtype)
    r_w = randn((B, H, M, N), gen, dtype)
    for with_w_loss in (False, True):
        out, w = interaction_attention(q, k, v, mask, is_causal=case["causal"], need_weights=True, backend=backend)
        w.retain_grad()
        seen = []
        w.register_hook(lambda g: seen.append(g.clone()))
        loss = (out * r_out).sum() + ((w * r_w).sum() if with_w_loss else 0)
        grads = torch.autograd.grad(loss, (q, k, v, w), retain_graph=True)
        w.grad = None  # retain_grad fills w.grad in autograd.grad too (as for eager tensors)
        loss.backward()

        q64, k64, v64 = detached64(q, k, v)
        ref_out, ref_p = reference_attention(q64, k64, v64, mask, is_causal=case["causal"])
        ref_p.retain_grad()
        ref_loss = (ref_out * r_out.double()).sum() + ((ref_p * r_w.double()).sum() if with_w_loss else 0)
        ref_loss.backward()
        assert w.grad is not None, "w.retain_grad(): w.grad is None, out is not on w's autograd path"
        assert len(seen) == 2, f"the hook on w fired {len(seen)} times for two backwards, expected 2"
        for name, got, want in (("w.grad", w.grad, ref_p.grad), ("hook", seen[-1], ref_p.grad),
                                 ("grad(loss, w)", grads[3], ref_p.grad), ("q", grads[0], q64.grad),
                                 ("k", grads[1], k64.grad), ("v", grads[2], v64.grad)):
            torch.testing.assert_close(got.double(), want, **_tol(dtype), msg=lambda m, n=name: f"{n}: {m}")
        for t in (q, k, v):
            t.grad = None


def test_full_maps_graph_3d_and_grad_of_out_wrt_w(backend):
    """3-D inputs (B, L, E) return (B, M, N) maps that feed out too; torch.autograd.grad(out, w) is
    dO V^T, as in eager."""
    dtype = _dtype_for(backend)
    gen = make_gen("maps_graph_3d", backend)
    q, k, v = (randn(s, gen, dtype, requires_grad=True) for s in ((2, 5, 8), (2, 7, 8), (2, 7, 6)))
    out, w = interaction_attention(q, k, v, need_weights=True, backend=backend)
    assert w.shape == (2, 5, 7)
    up = randn(out.shape, gen, dtype)
    (dw,) = torch.autograd.grad(out, w, up)
    torch.testing.assert_close(dw.double(), up.double() @ v.detach().double().transpose(-1, -2), **_tol(dtype))
    out.mul_(2)  # the output is an ordinary tensor: in-place ops are allowed, as on eager's


OBSERVERS = ["none", "hook", "hook_then_del", "retain_grad", "multi_grad_hook", "grad_inputs",
             "backward_inputs", "inplace_out", "create_graph", "retain_graph_twice", "3d_hook", "3d_none"]


@pytest.mark.parametrize("observer", OBSERVERS)
def test_full_maps_gradient_fused_unless_observed(backend, observer, monkeypatch):
    """Every row's maps returned, losses on out and the maps, in plain eager: a backward that no one
    can see dW in passes dO to the maps op's kernels (attention_pv computes no dW); a hook or
    retain_grad on the maps (even with the tensor deleted), a multi-grad hook, autograd.grad /
    backward(inputs=...), out changed in place, create_graph, and a retained graph's second
    backward make attention_pv compute dW as eager does. Either way every gradient, and what each
    observer sees, equals eager's in float64 (tests/reference.py)."""
    ops_module = importlib.import_module("lfi.ops.interaction_attention")
    pv_backwards = []
    pv_backward = ops_module._pv_backward
    monkeypatch.setattr(ops_module, "_pv_backward", lambda *a: pv_backwards.append(1) or pv_backward(*a))
    dtype = _dtype_for(backend)
    gen = make_gen("maps_fused", backend, observer)
    three_d = observer.startswith("3d")
    B, H, Hkv, M, N, D = (2, 1, 1, 5, 7, 8) if three_d else (2, 4, 2, 5, 7, 8)
    q, k, v = make_qkv(B, H, Hkv, M, N, D, dtype=dtype, gen=gen, requires_grad=True)
    args = (q[:, 0], k[:, 0], v[:, 0]) if three_d else (q, k, v)
    r_out = randn((B, H, M, D), gen, dtype)
    r_w = randn((B, H, M, N), gen, dtype)

    out, w = interaction_attention(*args, need_weights=True, backend=backend)
    seen = []
    if observer in ("hook", "hook_then_del", "3d_hook"):
        w.register_hook(lambda g: seen.append(g.clone()))
    elif observer == "retain_grad":
        w.retain_grad()
    elif observer == "multi_grad_hook":
        torch.autograd.graph.register_multi_grad_hook([w, out], lambda grads: seen.append(grads[0].clone()))
    if observer == "inplace_out":
        out.mul_(2)
    out4, w4 = (out.unsqueeze(1), w.unsqueeze(1)) if three_d else (out, w)
    loss = (out4 * r_out).sum() + (w4 * r_w).sum()
    if observer == "hook_then_del":
        del w, w4
    if observer == "grad_inputs":
        got = dict(zip("qkvw", torch.autograd.grad(loss, (q, k, v, w))))
    else:
        if observer == "backward_inputs":
            loss.backward(inputs=[q, k, v])
        elif observer == "create_graph":
            loss.backward(create_graph=True)
        elif observer == "retain_graph_twice":
            loss.backward(retain_graph=True)
            loss.backward()
        else:
            loss.backward()
        got = {"q": q.grad, "k": k.grad, "v": v.grad}

    q64, k64, v64 = detached64(q, k, v)
    for t in (q64, k64, v64):
        t.requires_grad_(True)
    ref_out, ref_p = reference_attention(q64, k64, v64)
    ref_p.retain_grad()
    ref_scale = 2.0 if observer == "inplace_out" else 1.0
    ref_loss = (ref_out * ref_scale * r_out.double()).sum() + (ref_p * r_w.double()).sum()
    ref_loss.backward()
    times = 2.0 if observer == "retain_graph_twice" else 1.0
    want = {"q": q64.grad * times, "k": k64.grad * times, "v": v64.grad * times, "w": ref_p.grad}
    if seen:
        got["w"] = seen[0].reshape(want["w"].shape)
    elif observer == "retain_grad":
        got["w"] = w.grad
    if observer in ("hook", "hook_then_del", "3d_hook", "multi_grad_hook", "retain_grad", "grad_inputs"):
        assert got.get("w") is not None, f"{observer}: the maps' gradient was not seen"
    for name, grad in got.items():
        torch.testing.assert_close(grad.double(), want[name], **_tol(dtype), msg=lambda m, n=name: f"{n}: {m}")
    # fused: no dW from attention_pv; a retained graph's second backward computes it
    expected = {"none": 0, "3d_none": 0, "retain_graph_twice": 1}.get(observer, 1)
    assert len(pv_backwards) == expected, (
        f"{observer}: attention_pv computed dW {len(pv_backwards)} times, expected {expected}")


FUSED_CASES = [
    dict(id="mask-causal-dead-row", B=1, H=2, Hkv=1, M=6, N=5, mask="bool", causal=True, kl=False),
    dict(id="float-mask-grad", B=2, H=2, Hkv=2, M=7, N=9, mask="float", causal=False, kl=False),
    dict(id="gqa-kl", B=2, H=4, Hkv=2, M=5, N=11, mask=None, causal=False, kl=True),
]


@pytest.mark.parametrize("case", case_params(FUSED_CASES))
def test_full_maps_fused_gradient_matches_attention_pv(backend, case):
    """The fused maps gradient (dO handed to the maps op's kernels) against attention_pv computing
    dW (made to by a hook on the maps) on the same call, with masks (a fully masked row, a float
    mask's gradient), causal masking, grouped heads and the fused KL in the loss: the same
    gradients (float64 where the backend has it; the hooked path is checked against float64 in
    test_full_maps_feed_out_as_in_eager)."""
    dtype = _dtype_for(backend)
    gen = make_gen("maps_fused_vs_pv", backend, case["id"])
    B, H, Hkv, M, N = case["B"], case["H"], case["Hkv"], case["M"], case["N"]
    q, k, v = make_qkv(B, H, Hkv, M, N, 8, dtype=dtype, gen=gen, requires_grad=True)
    mask = None
    if case["mask"] == "bool":
        mask = bool_mask((B, 1, M, N), gen)
        mask[0, 0, 2] = False
    elif case["mask"] == "float":
        mask = float_mask((B, H, M, N), gen, dtype=dtype).requires_grad_(True)
    target = torch.softmax(randn((B, 1, M, N), gen, dtype), -1) if case["kl"] else None
    r_out, r_w = randn((B, H, M, 8), gen, dtype), randn((B, H, M, N), gen, dtype)
    leaves = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    grads = []
    for hooked in (False, True):
        results = interaction_attention(q, k, v, mask, is_causal=case["causal"], need_weights=True,
                                        kl_target=target, backend=backend)
        out, w = results[:2]
        if hooked:
            w.register_hook(lambda g: g)
        loss = (out * r_out).sum() + (w * r_w).sum() + (results[2] if case["kl"] else 0)
        loss.backward()
        grads.append([t.grad for t in leaves])
        for t in leaves:
            t.grad = None
    for name, fused, via_pv in zip("qkvm", *grads):
        torch.testing.assert_close(fused, via_pv, **_tol(dtype), msg=lambda m, n=name: f"d{n}: {m}")


def test_row_subset_and_averaged_maps_stay_side_outputs(backend):
    """weights_rows and average_attn_weights keep the other graph: the maps are a side output (out
    does not depend on them; eager's nn.MultiheadAttention averages after P @ V too), so gradients
    reach them only from losses on them."""
    gen = make_gen("maps_side", backend)
    q, k, v = make_qkv(1, 2, 2, 6, 7, 8, gen=gen, requires_grad=True)
    for kw in (dict(weights_rows=(1, 4)), dict(average_attn_weights=True)):
        out, w = interaction_attention(q, k, v, need_weights=True, backend=backend, **kw)
        assert torch.autograd.grad(out.sum(), w, allow_unused=True) == (None,), kw


def test_full_maps_without_grad_take_no_extra_node():
    """Without grad mode (inference) the fused output is returned as is: no P @ V node, no copy."""
    gen = make_gen("maps_nograd")
    q, k, v = make_qkv(1, 2, 2, 6, 7, 8, gen=gen, requires_grad=True)
    with torch.no_grad():
        out, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    assert out.grad_fn is None and w.grad_fn is None


def test_attention_pv_opcheck():
    """The custom op behind the maps' graph passes torch.library.opcheck (schema, fake kernel,
    autograd registration, AOT dispatch with dynamic shapes), grouped-query heads included."""
    gen = make_gen("pv_opcheck")
    w = torch.softmax(randn((2, 4, 5, 7), gen), -1).requires_grad_(True)
    v = randn((2, 2, 7, 6), gen, requires_grad=True)
    out = (w.detach().unflatten(1, (2, 2)) @ v.detach().unsqueeze(2)).flatten(1, 2)
    torch.library.opcheck(torch.ops.lfi.attention_pv.default, (w, v, out))


@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_maps_peak_memory_in_maps(backend):
    """Peak memory of the benchmark suite's cases (lfi.benchmark.TensorMemory: every tensor a call
    creates, per storage; what max_memory_allocated measures on a GPU, which matched it on the
    H200), in maps: with every row's maps, forward and forward + backward (gradients on out and on
    the maps) each need the maps + 10 % over the same call without them (the backward makes no
    map-sized tensor: dO V^T is added in the kernels; it made 3.1 maps more with attention_pv
    computing dW, 4.2 with its float32 products)."""
    shape = bench.Shape("t", 1, 1, 197, 197, 16)
    one_map = 197 * 197 * 2

    def peak(mode, maps):
        case = bench.make_case(bench.get_impl("lfi_triton"), shape, torch.device(DEVICE), torch.bfloat16, mode, maps)
        case.step()
        for t in (case.q, case.k, case.v):
            t.grad = None
        return bench.peak_tensor_bytes(case.step)[1] / one_map

    assert peak("fwd", True) <= peak("fwd", False) + 1.1
    assert peak("fwd+bwd", True) <= peak("fwd+bwd", False) + 1.1


@pytest.mark.parametrize("backend", [backend_param("triton")])
@pytest.mark.parametrize("hkv", [2, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "hooked"])
def test_maps_backward_allocates(backend, hkv, hooked, monkeypatch):
    """Every row's maps returned (out read through attention_pv), 16-bit inputs, loss on out only.
    No one sees dW: the backward creates no map-sized tensor (the kernels take dO). A hook on the
    maps: one, dW = dO V^T in the inputs' dtype (as eager's backward of w @ v), already in the maps'
    padded row layout, which the backend takes without a copy (no float32 copies of W or dW: they
    were 3 float32 map-sized tensors, a cast and a padded copy)."""
    from lfi.backends.triton import interaction_attention as triton_backend

    seen = []
    backward = triton_backend.attention_backward

    def spy(grad_out, grad_weights, *args, **kwargs):
        seen.append((grad_out is not None, None if grad_weights is None else grad_weights.stride()))
        return backward(grad_out, grad_weights, *args, **kwargs)

    monkeypatch.setattr(triton_backend, "attention_backward", spy)
    gen = make_gen("maps_backward_allocates", hkv)
    B, H, M, N, D = 1, 2, 12, 37, 8  # a map (888 elements) is larger than q, k, v and padded v
    q, k, v = make_qkv(B, H, hkv, M, N, D, dtype=torch.bfloat16, gen=gen, requires_grad=True)
    out, w = interaction_attention(q, k, v, need_weights=True, backend=backend)
    if hooked:
        w.register_hook(lambda g: None)
    grad_out = randn(out.shape, gen, dtype=out.dtype)
    with bench.TensorMemory() as memory:
        out.backward(grad_out)
    map_sized = [(op, dtype) for op, dtype, nbytes in memory.allocations if nbytes >= B * H * M * N * 2]
    if hooked:
        assert map_sized == [("bmm.default", torch.bfloat16)]
        assert seen == [(False, w.stride())] and w.stride(-2) % 16 == 0 and w.stride(-2) > N
    else:
        assert map_sized == [] and seen == [(True, None)]
    q64, k64, v64 = detached64(q, k, v)
    for t in (q64, k64, v64):
        t.requires_grad_(True)
    ref_out, _ = reference_attention(q64, k64, v64)
    ref_out.backward(grad_out.double())
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(got, want, torch.bfloat16, grad=True, name=name)
