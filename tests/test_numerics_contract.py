"""The numerics contract of README "Numerics", on every backend of the matrix (torch, triton, cuda).

NaN / inf in q, k, v, a float mask or a KL target; rows with no attended key; KL with target mass on
keys the student gives -inf. Every case is compared, element by element, against eager float64
PyTorch computed from the same (rounded) inputs: ``softmax(scale * q k^T + mask) @ v`` (a bool mask
or causal masking by ``masked_fill(-inf)``, a float mask added) for attention, ``F.kl_div`` on the
normalised target for the KL ops (reference.eager_attention, reference.eager_kl_rows). "Same"
(helpers.assert_same) means: NaN at the same positions, the same infinities, and the finite values
within the usual tolerance (helpers.FWD_TOL / GRAD_TOL). The KL ops: test_numerics_contract_kl.py.

Two rules are the contract's own, not eager's: a row with no attended key gives zeros (eager: NaN),
and t = 0 terms of the KL contribute 0 also where the student gives -inf (F.kl_div: 0 * inf = NaN).
Gradients: the finite (batch, head) slices match eager autograd; the rows made NaN by the forward
get NaN gradients (to q of that row; to k and v of that kv head, as in eager autograd); the KL ops'
NaN rows are NaN at every kept key and 0 at dropped keys, and +inf rows get the finite g (p - t).
Shapes stay small (the Triton CPU interpreter costs milliseconds per tile) but cover a main-loop
and a ragged key block (N = 37 with 32-key tiles), two row blocks (M = 20 with 16-row tiles),
grouped-query heads (H = 4, Hkv = 2), the online pass (no maps), the two-pass maps path and a
window of map rows.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import DEVICE
from helpers import INTERPRETED
from helpers import as_gpu_nans
from helpers import assert_same
from helpers import backend_dtype_params
from helpers import force_exact_fp32_split
from helpers import make_gen
from helpers import randn
from lfi.ops import interaction_attention
from reference import eager_attention

# The Triton CPU interpreter evaluates with numpy, which warns on the non-finite values these cases are about
# (beyond helpers.INTERPRETER_NOISE, which conftest.py filters everywhere).
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]

NAN, INF = float("nan"), float("inf")
B, H, HKV, M, N, D = 2, 4, 2, 20, 37, 16


# --------------------------------------------------------------------------------------------------
# Attention: forward (out and maps)
# --------------------------------------------------------------------------------------------------

def _key_mask_false(idx):
    m = torch.ones(B, 1, 1, N, dtype=torch.bool)
    m[..., idx] = False
    return m


def _case_dead_rows_with_nans(q, k, v):
    """(0, *, 3) has no attended key (bool mask); NaN in v (kv head 0) and k (kv head 1) elsewhere."""
    m = torch.ones(B, 1, M, N, dtype=torch.bool)
    m[0, :, 3] = False
    v[0, 0, 8, 2] = NAN
    k[0, 1, 15, 0] = NAN
    return m, {}


def _case_dead_float_row_q_nan(q, k, v):
    """A float-mask row of -inf whose q is NaN: NaN + -inf = NaN, so the row is NaN, not empty."""
    m = randn((B, 1, M, N), make_gen("fmask_dead"))
    m[1, :, 6] = -INF
    m[0, :, 2] = -INF
    q[1, 2, 6, 0] = NAN  # NaN row
    return m, {}  # (0, *, 2) stays an empty row: zeros


def _case_dead_bool_row_q_nan(q, k, v):
    """A bool-masked row (no attended key) whose q is NaN: masked scores are never read, zeros."""
    m = torch.ones(B, 1, M, N, dtype=torch.bool)
    m[1, :, 6] = False
    q[1, 2, 6, 0] = NAN
    return m, {}


def _all_scores_neg_inf(mask=None, **kw):
    """Row (0, 2, 4) scores -inf at every key through q = +inf against k < 0 (kv head 1): without a
    mask the row is NaN (as eager); with a mask it counts as a row with no attended key (zeros)."""
    def setup(q, k, v):
        k[0, 1, :, 0] = -k[0, 1, :, 0].abs() - 0.1
        q[0, 2, 4, 0] = INF
        return (mask() if callable(mask) else mask), dict(kw)
    return setup


def _float_mask_with(idx, value):
    def setup(q, k, v):
        m = randn((B, 1, M, N), make_gen("fmask", idx))
        m[idx] = value
        return m, {}
    return setup


def _set(tensor_name, idx, value, mask=None, **kw):
    def setup(q, k, v):
        {"q": q, "k": k, "v": v}[tensor_name][idx] = value
        return (mask() if callable(mask) else mask), dict(kw)
    return setup


def _neg_inf_key_float_mask_k_nan(q, k, v):
    m = randn((B, 1, M, N), make_gen("fmask_key"))
    m[..., 11] = -INF
    k[0, 1, 11, 3] = NAN  # NaN + -inf = NaN: every row of kv head 1 (q heads 2, 3) of batch 0 is NaN
    return m, {}


def _bool_2d_mask_k_nan(q, k, v):
    m = torch.rand(B, 1, M, N, generator=make_gen("bool2d")) < 0.8
    m[..., 0] = True
    m[..., 11] = False
    k[0, 1, 11, 3] = NAN  # never read: every row masks key 11
    k[1, 0, 12, 0] = NAN  # read by the rows that attend key 12
    return m, {}


ATTENTION_CASES = [
    dict(id="q_nan", setup=_set("q", (0, 1, 3, 5), NAN)),
    dict(id="q_-inf", setup=_set("q", (1, 2, 0, 2), -INF)),
    dict(id="k_nan", setup=_set("k", (0, 1, 20, 3), NAN)),
    dict(id="k_+inf", setup=_set("k", (1, 0, 4, 0), INF)),
    dict(id="v_nan", setup=_set("v", (0, 0, 9, 1), NAN)),
    dict(id="v_+inf", setup=_set("v", (1, 1, 30, 0), INF)),
    dict(id="float_mask_nan", setup=_float_mask_with((0, 0, 2, 11), NAN)),
    dict(id="float_mask_+inf", setup=_float_mask_with((1, 0, 4, 36), INF)),
    dict(id="float_mask_-inf_key_k_nan", setup=_neg_inf_key_float_mask_k_nan),
    dict(id="key_padding_masked_k_nan", setup=_set("k", (0, 1, 11, 3), NAN, mask=lambda: _key_mask_false(11))),
    dict(id="bool_mask_masked_k_nan", setup=_bool_2d_mask_k_nan),
    # top-left causal, M < N: key 5 is attended by rows 5.. only, key 30 by none (its block is skipped)
    dict(id="causal_k_nan", setup=_set("k", (0, 0, 5, 1), NAN, is_causal=True)),
    dict(id="causal_unattended_k_nan", setup=_set("k", (1, 1, 30, 1), NAN, is_causal=True)),
    dict(id="dead_rows_with_nans", setup=_case_dead_rows_with_nans),
    dict(id="all_scores_-inf_no_mask", setup=_all_scores_neg_inf()),
    dict(id="all_scores_-inf_causal", setup=_all_scores_neg_inf(is_causal=True)),
    dict(id="all_scores_-inf_masked", setup=_all_scores_neg_inf(mask=lambda: _key_mask_false(11))),
    dict(id="dead_float_row_q_nan", setup=_case_dead_float_row_q_nan),
    dict(id="dead_bool_row_q_nan", setup=_case_dead_bool_row_q_nan),
]

MODES = {
    "out": dict(need_weights=False),                           # the online pass
    "maps": dict(need_weights=True),                           # the two-pass maps path, every row
    "rows": dict(need_weights=True, weights_rows=(15, 19)),    # a window: one row block online, one with maps
}


def _attention_inputs(case, dtype, requires_grad=False, gpu_nan=False):
    """gpu_nan: every NaN input as 0x7FFFFFFF, the NaN that NVIDIA GPUs compute (numpy's is 0x7FC00000)."""
    gen = make_gen("numerics_attention", case["id"])
    q = randn((B, H, M, D), gen)
    k = randn((B, HKV, N, D), gen)
    v = randn((B, HKV, N, D), gen)
    mask, kw = case["setup"](q, k, v)
    if gpu_nan:
        as_gpu_nans(q, k, v, mask)
    q, k, v = (t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (q, k, v))
    if mask is not None:
        mask = mask.to(DEVICE) if mask.dtype == torch.bool else mask.to(DEVICE, dtype)
    return q, k, v, mask, kw


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params([torch.float32]))
def test_attention_nonfinite_inputs(backend, dtype, case, mode):
    """out and maps against eager float64: NaN / inf rows (and v's NaN / inf columns) exactly where
    eager has them, zeros on rows with no attended key, finite values within tolerance."""
    _check_nonfinite_inputs(backend, dtype, case, mode)


@pytest.mark.skipif(not INTERPRETED, reason="forces the Triton kernels' exact-float32 split under the CPU interpreter")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES])
def test_attention_nonfinite_inputs_3xtf32(case, mode, monkeypatch):
    """The same contract through the exact-float32 path of CUDA devices (float32 without TF32:
    operands split into TF32 parts, three products each; kernels/interaction_attention.py
    _tf32_parts), with the GPUs' NaN bit pattern: an inf operand or a NaN split wrongly gives NaN for
    inf (0 * inf in a low-part product) or 0 for NaN."""
    force_exact_fp32_split(monkeypatch)
    _check_nonfinite_inputs("triton", torch.float32, case, mode, gpu_nan=True)


def _check_nonfinite_inputs(backend, dtype, case, mode, gpu_nan=False):
    q, k, v, mask, kw = _attention_inputs(case, dtype, gpu_nan=gpu_nan)
    opts = MODES[mode]
    res = interaction_attention(q, k, v, mask, backend=backend, **kw, **opts)
    out, w = res if opts["need_weights"] else (res, None)
    ref_out, ref_p = eager_attention(q, k, v, mask, is_causal=kw.get("is_causal", False))
    assert_same(out, ref_out, dtype, name="out")
    if w is not None:
        r0, r1 = opts.get("weights_rows") or (0, M)
        assert_same(w, ref_p[:, :, r0:r1], dtype, name="weights")


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES
                                  if c["id"] in ("q_nan", "k_nan", "float_mask_nan", "dead_rows_with_nans",
                                                 "causal_k_nan")])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params([torch.float16, torch.bfloat16, torch.float64]))
def test_attention_nonfinite_inputs_dtypes(backend, dtype, case):
    """The same contract in the other dtypes (maps path and online path)."""
    q, k, v, mask, kw = _attention_inputs(case, dtype)
    ref_out, ref_p = eager_attention(q, k, v, mask, is_causal=kw.get("is_causal", False))
    out, w = interaction_attention(q, k, v, mask, need_weights=True, backend=backend, **kw)
    assert_same(out, ref_out, dtype, name="out (maps path)")
    assert_same(w, ref_p, dtype, name="weights")
    out = interaction_attention(q, k, v, mask, backend=backend, **kw)
    assert_same(out, ref_out, dtype, name="out (online path)")


# --------------------------------------------------------------------------------------------------
# Attention: gradients
# --------------------------------------------------------------------------------------------------

GRAD_CASES = ["q_nan", "k_nan", "v_nan", "float_mask_nan", "causal_k_nan", "dead_bool_row_q_nan",
              "all_scores_-inf_no_mask"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES if c["id"] in GRAD_CASES])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params([torch.float32]))
def test_attention_nonfinite_gradients(backend, dtype, case):
    """Gradients of a loss on out and maps: every (batch, head) slice whose forward is finite gets
    eager's gradients; a row whose maps are NaN gets a NaN dq row, and NaN reaches dk, dv of its
    kv head (as in eager autograd); rows with no attended key get a zero dq row."""
    _check_nonfinite_gradients(backend, dtype, case)


@pytest.mark.skipif(not INTERPRETED, reason="forces the Triton kernels' exact-float32 split under the CPU interpreter")
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES if c["id"] in GRAD_CASES])
def test_attention_nonfinite_gradients_3xtf32(case, monkeypatch):
    """The gradients' contract through the exact-float32 split (see test_attention_nonfinite_inputs_3xtf32)."""
    force_exact_fp32_split(monkeypatch)
    _check_nonfinite_gradients("triton", torch.float32, case, gpu_nan=True)


def _check_nonfinite_gradients(backend, dtype, case, gpu_nan=False):
    q, k, v, mask, kw = _attention_inputs(case, dtype, requires_grad=True, gpu_nan=gpu_nan)
    out, w = interaction_attention(q, k, v, mask, need_weights=True, backend=backend, **kw)
    gen = make_gen("numerics_grad", case["id"])
    r_out, r_w = randn(out.shape, gen), randn(w.shape, gen)
    dq, dk, dv = torch.autograd.grad((out * r_out).sum() + (w * r_w).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_out, ref_p = eager_attention(q64, k64, v64, mask, is_causal=kw.get("is_causal", False))
    # eager's gradients where the slice is finite (NaN slices are compared by pattern below)
    ok_q = torch.isfinite(ref_out).flatten(2).all(-1) & torch.isfinite(ref_p).flatten(2).all(-1)  # (B, H)
    ok_kv = ok_q.unflatten(1, (HKV, H // HKV)).all(-1)  # (B, Hkv)
    loss64 = (torch.where(ok_q[..., None, None], ref_out, 0.0) * r_out.double()).sum() \
        + (torch.where(ok_q[..., None, None], ref_p, 0.0) * r_w.double()).sum()
    edq, edk, edv = torch.autograd.grad(loss64, (q64, k64, v64))
    assert_same(dq[ok_q], edq[ok_q], dtype, grad=True, name="dq (finite slices)")
    assert_same(dk[ok_kv], edk[ok_kv], dtype, grad=True, name="dk (finite slices)")
    assert_same(dv[ok_kv], edv[ok_kv], dtype, grad=True, name="dv (finite slices)")
    nan_rows = ref_p.isnan().any(-1)  # (B, H, M)
    assert bool(dq.isnan()[nan_rows].all()), "rows that are NaN in the forward must get NaN in dq"
    for b, hk in (~ok_kv).nonzero().tolist():
        if nan_rows[b, hk * (H // HKV):(hk + 1) * (H // HKV)].any():
            assert dk[b, hk].isnan().any() and dv[b, hk].isnan().any(), "NaN rows must reach dk and dv"
    dead = (ref_p == 0).all(-1) & ~nan_rows
    assert bool((dq[dead] == 0).all()), "rows with no attended key get zero gradients"


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATTENTION_CASES
                                  if c["id"] in ("q_nan", "v_nan", "dead_rows_with_nans", "all_scores_-inf_no_mask")])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params([torch.float32]))
def test_dropout_path_nonfinite(backend, dtype, case):
    """dropout_p > 0 (the eager path every backend falls back to): the maps (pre-dropout) are as
    without dropout, and out has NaN exactly where eager has it (dropout's zeros do not hide a NaN:
    0 * NaN is NaN) and zeros on rows with no attended key."""
    q, k, v, mask, kw = _attention_inputs(case, dtype)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # triton / cuda warn once that dropout falls back to the eager path
        warnings.simplefilter("ignore")
        out, w = interaction_attention(q, k, v, mask, dropout_p=0.3, need_weights=True, backend=backend, **kw)
    ref_out, ref_p = eager_attention(q, k, v, mask, is_causal=kw.get("is_causal", False))
    assert_same(w, ref_p, dtype, name="weights")
    assert torch.equal(out.isnan().cpu(), ref_out.isnan().cpu()), "out: NaN positions differ from eager"
    dead = ((ref_p == 0).all(-1) & ~ref_p.isnan().any(-1)).cpu()
    assert bool((out.cpu()[dead] == 0).all()), "rows with no attended key must be zeros"
