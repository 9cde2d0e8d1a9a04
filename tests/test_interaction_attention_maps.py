"""interaction_attention's maps against the float64 reference (tests/reference.py): need_weights,
average_attn_weights and weights_rows (tuple or slice), with losses on the output, the maps or both,
with masks and causal masking; and the autograd graph of the maps (every row's maps feed out, as in
eager: retain_grad, hooks). Every backend of the matrix (helpers.BACKEND_PARAMS).
"""
from __future__ import annotations

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
    H200), in maps: a forward with every row's maps needs the maps + 10 % over the same call without
    them; forward + backward with gradients on out and the maps at most 3.1 maps more (the maps,
    the gradient from out, autograd's sum of it with the maps' gradient; it was 4.2 with the float32
    products of the maps' backward)."""
    shape = bench.Shape("t", 1, 1, 197, 197, 16)
    one_map = 197 * 197 * 2

    def peak(mode, maps):
        case = bench.make_case(bench.get_impl("lfi_triton"), shape, torch.device(DEVICE), torch.bfloat16, mode, maps)
        case.step()
        for t in (case.q, case.k, case.v):
            t.grad = None
        return bench.peak_tensor_bytes(case.step)[1] / one_map

    assert peak("fwd", True) <= peak("fwd", False) + 1.1
    assert peak("fwd+bwd", True) <= peak("fwd+bwd", False) + 3.1


@pytest.mark.parametrize("backend", [backend_param("triton")])
@pytest.mark.parametrize("hkv", [2, 1], ids=["mha", "gqa"])
def test_maps_backward_allocates_one_map(backend, hkv, monkeypatch):
    """Every row's maps returned (out read through attention_pv), 16-bit inputs, loss on out only:
    the backward creates one map-sized tensor, dW = dO V^T in the inputs' dtype (as eager's backward
    of w @ v), already in the maps' padded row layout, which the backend takes without a copy (no
    float32 copies of W or dW: they were 3 float32 map-sized tensors, a cast and a padded copy)."""
    from lfi.backends.triton import interaction_attention as triton_backend

    seen_strides = []
    backward = triton_backend.attention_backward

    def spy(grad_out, grad_weights, *args, **kwargs):
        seen_strides.append(grad_weights.stride())
        return backward(grad_out, grad_weights, *args, **kwargs)

    monkeypatch.setattr(triton_backend, "attention_backward", spy)
    gen = make_gen("maps_backward_allocates", hkv)
    B, H, M, N, D = 1, 2, 12, 37, 8  # a map (888 elements) is larger than q, k, v and padded v
    q, k, v = make_qkv(B, H, hkv, M, N, D, dtype=torch.bfloat16, gen=gen, requires_grad=True)
    out, w = interaction_attention(q, k, v, need_weights=True, backend=backend)
    grad_out = randn(out.shape, gen, dtype=out.dtype)
    with bench.TensorMemory() as memory:
        out.backward(grad_out)
    map_sized = [(op, dtype) for op, dtype, nbytes in memory.allocations if nbytes >= B * H * M * N * 2]
    assert map_sized == [("bmm.default", torch.bfloat16)]
    assert seen_strides == [w.stride()] and w.stride(-2) % 16 == 0 and w.stride(-2) > N
    q64, k64, v64 = detached64(q, k, v)
    for t in (q64, k64, v64):
        t.requires_grad_(True)
    ref_out, _ = reference_attention(q64, k64, v64)
    ref_out.backward(grad_out.double())
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(got, want, torch.bfloat16, grad=True, name=name)
