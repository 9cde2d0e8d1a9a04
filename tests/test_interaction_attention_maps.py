"""interaction_attention's maps against the float64 reference (tests/reference.py): need_weights,
average_attn_weights and weights_rows (tuple or slice), with losses on the output, the maps or both,
with masks and causal masking. Every backend of the matrix (helpers.BACKEND_PARAMS).
"""
from __future__ import annotations

import pytest
import torch
from helpers import BACKEND_PARAMS, float_mask, make_gen, make_qkv, run_and_compare

from lfi.ops import interaction_attention

# --------------------------------------------------------------------------------------------------
# need_weights / average_attn_weights / weights_rows, losses on out, weights or both
# --------------------------------------------------------------------------------------------------

WB, WH, WHKV, WM, WN = 1, 4, 2, 37, 45
ROWS = [None, (0, 1), (3, 21), (16, 32), (WM - 1, WM), (0, WM)]


def _rows_id(r):
    return "all" if r is None else f"{r[0]}-{r[1]}"


@pytest.mark.parametrize("average", [False, True], ids=["heads", "avg"])
@pytest.mark.parametrize("rows", ROWS, ids=_rows_id)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
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
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_loss_on_out_or_weights(backend, rows, average, loss):
    gen = make_gen("loss_modes", backend, rows, "avg", loss) if average else make_gen("loss_modes", backend, rows,
                                                                                      loss)
    q, k, v = make_qkv(WB, WH, WHKV, WM, WN, 32, gen=gen, requires_grad=True)
    run_and_compare(backend, q, k, v, need_weights=True, average=average, rows=rows, loss=loss, gen=gen)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
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


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
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
