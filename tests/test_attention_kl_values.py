"""lfi.ops.attention_kl (KL(target || softmax(logits / T)) per attention row): values and gradients
over shapes, target kinds, temperatures, broadcasting, key masks, reductions and dtypes, against the
float64 references of tests/reference.py (how: tests/kl_cases.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE
from helpers import DTYPE_IDS
from helpers import assert_close
from helpers import backend_dtype_params
from helpers import case_params
from helpers import detached64
from helpers import make_gen
from helpers import randn
from kl_cases import REDUCTIONS
from kl_cases import TARGET_KINDS
from kl_cases import check_kl
from kl_cases import check_reduced_loss
from kl_cases import key_mask_of
from kl_cases import make_target
from kl_cases import target_shape
from lfi.ops import attention_kl
from reference import ref_kl_rows
from reference import ref_reduce
from reference import ref_student_log_probs
from reference import ref_target_probs

# --------------------------------------------------------------------------------------------------
# Per-row values and gradients: shapes, target kinds, temperatures, broadcasting, key masks
# --------------------------------------------------------------------------------------------------

CASES = [
    dict(id="probs_B1MN_T1", B=2, H=2, M=5, N=37, tshape="B1MN", target_is="probs", T=1.0, mask=None),
    dict(id="probs_BHMN_T05_M20_N17", B=1, H=2, M=20, N=17, tshape="BHMN", target_is="probs", T=0.5, mask=None),
    dict(id="probs_111N_T2_keymaskB11N", B=2, H=2, M=6, N=40, tshape="111N", target_is="probs", T=2.0,
         mask="B11N"),
    dict(id="probs_unnormalized_keymask11MN", B=1, H=2, M=9, N=33, tshape="B1MN", target_is="probs", T=1.0,
         mask="11MN", normalized=False),
    dict(id="logits_B1MN_T2_keymaskBHMN", B=2, H=2, M=7, N=33, tshape="B1MN", target_is="logits", T=2.0,
         mask="BHMN"),
    dict(id="logits_BHMN_T05_keymaskN", B=1, H=3, M=4, N=70, tshape="BHMN", target_is="logits", T=0.5, mask="N"),
    dict(id="log_probs_B1MN_T2", B=2, H=2, M=5, N=21, tshape="B1MN", target_is="log_probs", T=2.0, mask=None),
    dict(id="log_probs_MN_T05_keymask1H1N", B=1, H=2, M=17, N=9, tshape="MN", target_is="log_probs", T=0.5,
         mask="1H1N"),
    dict(id="probs_M1_N1", B=2, H=2, M=1, N=1, tshape="BHMN", target_is="probs", T=1.0, mask=None),
    dict(id="logits_M3_N70_111N", B=2, H=1, M=3, N=70, tshape="111N", target_is="logits", T=1.0, mask="B11N"),
]


@pytest.mark.parametrize("case", case_params(CASES))
def test_matches_reference(backend, case):
    gen = make_gen("kl_cases", case["id"], backend)
    B, H, M, N = (case[x] for x in "BHMN")
    logits = randn((B, H, M, N), gen, requires_grad=True, scale=2.0)
    target = make_target(target_shape(case["tshape"], B, H, M, N), case["target_is"], gen,
                         normalized=case.get("normalized", True))
    key_mask = key_mask_of(case["mask"], B, H, M, N, gen)
    check_kl(backend, logits, target, target_is=case["target_is"], temperature=case["T"], key_mask=key_mask,
             gen=gen)


def test_n1_gives_zero(backend):
    """With one key both distributions are one-hot: KL = 0 and dlogits = 0."""
    gen = make_gen("n1", backend)
    logits = randn((2, 2, 3, 1), gen, requires_grad=True)
    kl, g = check_kl(backend, logits, make_target((2, 1, 3, 1), "logits", gen), target_is="logits", gen=gen)
    assert (kl == 0).all() and (g == 0).all()


# --------------------------------------------------------------------------------------------------
# Reductions x temperatures, with a scalar weight on the loss (grad_output != 1)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(backend, reduction, temperature):
    gen = make_gen("kl_red", backend, reduction, temperature)
    B, H, M, N = 2, 2, 6, 33
    logits = randn((B, H, M, N), gen, requires_grad=True, scale=2.0)
    target = make_target((B, 1, M, N), "probs", gen)
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    loss = attention_kl(logits, target, temperature=temperature, reduction=reduction, key_mask=key_mask,
                        backend=backend)
    (lg64,) = detached64(logits)
    rows = ref_kl_rows(lg64, target, "probs", temperature, key_mask)
    weight = 0.37 if reduction != "none" else randn(loss.shape, gen, loss.dtype, loss.device)
    (got,) = check_reduced_loss(loss, ref_reduce(rows, reduction, B), (logits,), (lg64,), weight, names=["logits"])
    # reductions documented explicitly: mean = sum / (B*H*M) rows, batchmean = sum / B
    if reduction == "mean":
        torch.testing.assert_close(loss.double(), rows.sum().detach() / (B * H * M), atol=1e-5, rtol=1e-5)
    if reduction == "batchmean":
        torch.testing.assert_close(loss.double(), rows.sum().detach() / B, atol=1e-5, rtol=1e-5)
    # d/dlogits = weight * (softmax(s) - t) / T, explicitly (rows of the kept keys)
    if reduction == "sum":
        p = torch.exp(ref_student_log_probs(lg64.detach() / temperature, key_mask))
        p = torch.where(key_mask.expand(p.shape), p, torch.zeros_like(p))
        t = ref_target_probs(target, p.shape, "probs", temperature, key_mask)
        assert_close(got, weight * (p - t) / temperature, torch.float32, grad=True, name="dlogits formula")


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_matches_f_kl_div_without_mask(backend):
    """Without a mask and with normalised targets: 'sum' and 'batchmean' equal F.kl_div's; 'mean' is
    per row, i.e. F.kl_div(reduction='mean') * N (F.kl_div's mean is over all elements)."""
    gen = make_gen("f_kl_div", backend)
    B, H, M, N = 2, 2, 5, 29
    logits = randn((B, H, M, N), gen, scale=2.0)
    target = make_target((B, H, M, N), "probs", gen)
    logp = F.log_softmax(logits.double() / 1.5, -1)
    t = target.double()
    for reduction in ("sum", "batchmean"):
        got = attention_kl(logits, target, temperature=1.5, reduction=reduction, backend=backend)
        assert_close(got, F.kl_div(logp, t, reduction=reduction), torch.float32, grad=True, name=reduction)
    got = attention_kl(logits, target, temperature=1.5, reduction="mean", backend=backend)
    assert_close(got, F.kl_div(logp, t, reduction="mean") * N, torch.float32, grad=True, name="mean")
    got = attention_kl(logits, torch.log_softmax(target.double().log(), -1).float(), target_is="log_probs",
                       temperature=1.5, reduction="sum", backend=backend)
    assert_close(got, F.kl_div(logp, t.log(), reduction="sum", log_target=True), torch.float32, grad=True,
                 name="log_probs sum")


def test_default_reduction_is_batchmean(backend):
    gen = make_gen("default_red", backend)
    logits = randn((3, 2, 4, 19), gen)
    target = make_target((3, 2, 4, 19), "probs", gen)
    a = attention_kl(logits, target, backend=backend)
    b = attention_kl(logits, target, reduction="batchmean", backend=backend)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert_close(a, ref_kl_rows(logits.double(), target).sum() / 3, torch.float32, grad=True, name="batchmean")


# --------------------------------------------------------------------------------------------------
# dtypes (fp32 accumulation from fp16/bf16 inputs; fp64 on the torch backend)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype,target_is", backend_dtype_params(cases=TARGET_KINDS))
def test_dtypes(backend, dtype, target_is):
    gen = make_gen("kl_dtypes", backend, DTYPE_IDS[dtype], target_is)
    B, H, M, N = 2, 2, 7, 45
    logits = randn((B, H, M, N), gen, dtype, requires_grad=True, scale=3.0)
    target = make_target((B, 1, M, N), target_is, gen, dtype=dtype)  # target in the same low precision
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    kl, g = check_kl(backend, logits, target, target_is=target_is, temperature=1.5, key_mask=key_mask, gen=gen)
    assert g.dtype == dtype


@pytest.mark.parametrize("dtype,target_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float16), (torch.float32, torch.float64)],
                         ids=["fp16-fp32target", "bf16-fp32target", "fp32-fp16target", "fp32-fp64target"])
def test_mixed_target_dtype(backend, dtype, target_dtype):
    """A teacher in another float dtype than the student logits (mixed dtypes are allowed)."""
    gen = make_gen("kl_mixed", backend, DTYPE_IDS[dtype], DTYPE_IDS[target_dtype])
    logits = randn((1, 2, 9, 40), gen, dtype, requires_grad=True, scale=2.0)
    target = make_target((1, 2, 9, 40), "logits", gen, dtype=target_dtype)
    check_kl(backend, logits, target, target_is="logits", temperature=0.5, gen=gen)


def test_fp32_accumulation_low_precision(backend):
    """Long fp16 rows whose terms are tiny: an fp16 accumulator would lose them; fp32 keeps them."""
    gen = make_gen("kl_acc", backend)
    N = 70
    logits = randn((1, 2, 3, N), gen, torch.float16, requires_grad=True, scale=0.01)
    target = make_target((1, 2, 3, N), "logits", gen, dtype=torch.float16) * 0.01
    kl, _ = check_kl(backend, logits, target, target_is="logits", gen=gen, dtype=torch.float32)
    assert (kl > 0).all()


INTERPRETER_COST = ("rows of 300 keys, 3 target kinds x 2 masks per dtype (~8 s there); test_dtypes covers "
                    "Triton's dtypes")


@pytest.mark.parametrize("target_is", TARGET_KINDS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(skip_interpreter=INTERPRETER_COST))
def test_dtypes_long_rows(backend, dtype, masked, target_is):
    """From the cuda backend's suite: rows of 300 keys in every dtype, without and with a key mask (a
    batch element without a kept key gives 0), a probability target with a zero row."""
    gen = make_gen("kl_long_rows", backend, DTYPE_IDS[dtype], masked, target_is)
    B, H, M, N = 2, 3, 7, 300
    logits = randn((B, H, M, N), gen, dtype, requires_grad=True, scale=3.0)
    if target_is == "probs":
        target = torch.rand(B, 1, M, N, generator=gen)
        target[0, 0, 1] = 0.0
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-6)
    elif target_is == "logits":
        target = torch.randn(B, 1, M, N, generator=gen) * 2
    else:
        target = torch.log_softmax(torch.randn(B, 1, M, N, generator=gen), -1)
    key_mask = None
    if masked:
        key_mask = torch.rand(B, 1, 1, N, generator=gen) < 0.6
        key_mask[1] = False  # rows without a kept key give 0
        key_mask = key_mask.to(DEVICE)
    kl, g = check_kl(backend, logits, target.to(DEVICE), target_is=target_is, temperature=1.5, key_mask=key_mask,
                     gen=gen)
    assert g.dtype == dtype
    if masked:
        assert (kl[1] == 0).all() and (g[1] == 0).all()
