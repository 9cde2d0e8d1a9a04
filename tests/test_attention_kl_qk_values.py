"""lfi.ops.attention_kl_qk (the attention KL with student logits scale * q k^T, and an optional
implicit teacher scale_t * q_t k_t^T, never materialized): values and gradients over dense and
implicit teachers, GQA, temperatures, scales, key masks, reductions and dtypes. Against the float64
references of tests/reference.py (how: tests/kl_cases.py).
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE
from helpers import DTYPE_IDS
from helpers import assert_close
from helpers import backend_dtype_params
from helpers import case_params
from helpers import detached64
from helpers import make_gen
from helpers import randn
from kl_cases import REDUCTIONS
from kl_cases import check_kl_qk
from kl_cases import check_reduced_loss
from kl_cases import implicit_teacher
from kl_cases import key_mask_of
from kl_cases import make_target
from kl_cases import target_shape
from lfi.ops import attention_kl
from lfi.ops import attention_kl_qk
from reference import ref_kl_qk_rows
from reference import ref_reduce
from reference import ref_student_logits
from reference import ref_teacher_logits


def _teacher(case, B, H, M, N, gen, dtype=torch.float32):
    """The target of a case: ('dense', shape name, kind) or ('implicit', Ht, Htk, Dt)."""
    t = case["teacher"]
    if t[0] == "dense":
        return make_target(target_shape(t[1], B, H, M, N), t[2], gen, dtype=dtype), t[2]
    _, Ht, Htk, Dt = t
    return implicit_teacher(B, M, N, Dt, gen, dtype, H if Ht == "H" else Ht, H if Htk == "H" else Htk), "logits"


# --------------------------------------------------------------------------------------------------
# Values and gradients: dense and implicit teachers, GQA, temperatures, scales, key masks
# --------------------------------------------------------------------------------------------------

CASES = [
    dict(id="dense_probs_B1MN_gqa4-2", B=2, H=4, Hkv=2, M=9, N=33, D=16, teacher=("dense", "B1MN", "probs"),
         T=1.0, mask="B11N"),
    dict(id="dense_logits_BHMN_gqa2-1_M20_N17_T2", B=1, H=2, Hkv=1, M=20, N=17, D=32,
         teacher=("dense", "BHMN", "logits"), T=2.0, mask=None),
    dict(id="dense_log_probs_111N_N70_T05", B=2, H=2, Hkv=2, M=5, N=70, D=16,
         teacher=("dense", "111N", "log_probs"), T=0.5, mask="11MN"),
    dict(id="implicit_Ht1_Htk1_Dt24_T2", B=2, H=4, Hkv=1, M=7, N=33, D=16, teacher=("implicit", 1, 1, 24),
         T=2.0, mask="11MN"),
    dict(id="implicit_HtH_HtkH_scales_T05", B=1, H=2, Hkv=2, M=11, N=40, D=24, teacher=("implicit", "H", "H", 16),
         T=0.5, mask="BHMN", scale=0.3, scale_t=0.45),
    dict(id="implicit_Ht4_Htk2_Dt8", B=1, H=4, Hkv=2, M=6, N=21, D=16, teacher=("implicit", "H", 2, 8),
         T=1.0, mask=None),
    dict(id="dense_probs_M1_N1", B=2, H=2, Hkv=1, M=1, N=1, D=16, teacher=("dense", "B1MN", "probs"), T=1.0,
         mask=None),
]


@pytest.mark.parametrize("case", case_params(CASES))
def test_matches_reference(backend, case):
    gen = make_gen("klqk_cases", case["id"], backend)
    B, H, Hkv, M, N, D = (case[x] for x in ("B", "H", "Hkv", "M", "N", "D"))
    q = randn((B, H, M, D), gen, requires_grad=True, scale=1.5)
    k = randn((B, Hkv, N, D), gen, requires_grad=True, scale=1.5)
    target, target_is = _teacher(case, B, H, M, N, gen)
    kw = dict(temperature=case["T"], key_mask=key_mask_of(case["mask"], B, H, M, N, gen))
    if "scale" in case:
        kw["scale"] = case["scale"]
    if "scale_t" in case:
        kw["scale_t"] = case["scale_t"]
    if isinstance(target, torch.Tensor):
        kw["target_is"] = target_is
    check_kl_qk(backend, q, k, target, gen=gen, **kw)


@pytest.mark.parametrize("N", [1, 33, 70])
def test_odd_key_counts(backend, N):
    gen = make_gen("klqk_oddN", backend, N)
    B, H, M, D = 1, 2, 9, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, 1, N, D), gen, requires_grad=True)
    check_kl_qk(backend, q, k, make_target((B, 1, M, N), "probs", gen), temperature=2.0, gen=gen)
    kl, _, _ = check_kl_qk(backend, q, k, implicit_teacher(B, M, N, 8, gen), gen=gen)
    if N == 1:
        assert (kl == 0).all()


def test_same_as_attention_kl_on_materialized_logits(backend):
    """attention_kl_qk(q, k, t) == attention_kl(scale * q k^T, t) for dense targets, and for an
    implicit teacher == attention_kl(student, scale_t * q_t k_t^T, target_is='logits')."""
    gen = make_gen("klqk_vs_kl", backend)
    B, H, Hkv, M, N, D = 2, 2, 1, 7, 35, 16
    q, k = randn((B, H, M, D), gen), randn((B, Hkv, N, D), gen)
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    logits = (ref_student_logits(q, k, 0.4)).float()
    target = make_target((B, 1, M, N), "logits", gen)
    a = attention_kl_qk(q, k, target, scale=0.4, target_is="logits", temperature=1.7, key_mask=key_mask,
                        reduction="none", backend=backend)
    b = attention_kl(logits, target, target_is="logits", temperature=1.7, key_mask=key_mask, reduction="none",
                     backend=backend)
    torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)
    q_t, k_t = implicit_teacher(B, M, N, 8, gen)
    a = attention_kl_qk(q, k, (q_t, k_t), scale=0.4, scale_t=0.6, temperature=1.7, key_mask=key_mask,
                        reduction="none", backend=backend)
    b = attention_kl(logits, ref_teacher_logits(q_t, k_t, 0.6).float(), target_is="logits", temperature=1.7,
                     key_mask=key_mask, reduction="none", backend=backend)
    torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_default_scales(backend):
    """scale defaults to D ** -0.5 and scale_t to Dt ** -0.5 (Dt != D)."""
    gen = make_gen("klqk_scales", backend)
    B, H, M, N, D, Dt = 1, 2, 5, 19, 16, 36
    q, k = randn((B, H, M, D), gen), randn((B, H, N, D), gen)
    q_t, k_t = randn((B, H, M, Dt), gen), randn((B, 1, N, Dt), gen)
    a = attention_kl_qk(q, k, (q_t, k_t), reduction="none", backend=backend)
    b = attention_kl_qk(q, k, (q_t, k_t), scale=D ** -0.5, scale_t=Dt ** -0.5, reduction="none", backend=backend)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert_close(a, ref_kl_qk_rows(q.double(), k.double(), (q_t, k_t)), torch.float32, grad=True, name="kl")


# --------------------------------------------------------------------------------------------------
# Reductions x {dense, implicit}, with a scalar weight on the loss (grad_output != 1)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["dense", "implicit"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(backend, reduction, teacher):
    gen = make_gen("klqk_red", backend, reduction, teacher)
    B, H, Hkv, M, N, D = 2, 2, 1, 5, 24, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, requires_grad=True)
    target = make_target((B, 1, M, N), "probs", gen) if teacher == "dense" else \
        implicit_teacher(B, M, N, 8, gen)
    T = {"none": 1.0, "sum": 0.5, "mean": 2.0, "batchmean": 1.0}[reduction]
    loss = attention_kl_qk(q, k, target, temperature=T, reduction=reduction, backend=backend)
    q64, k64 = detached64(q, k)
    want = ref_reduce(ref_kl_qk_rows(q64, k64, target, temperature=T), reduction, B)
    weight = 2.5 if reduction != "none" else randn(loss.shape, gen)
    check_reduced_loss(loss, want, (q, k), (q64, k64), weight, names="qk")


# --------------------------------------------------------------------------------------------------
# dtypes (fp16/bf16 inputs, fp32 accumulation; fp64 on torch), mixed teacher dtype
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype,teacher", backend_dtype_params(cases=["dense", "implicit"]))
def test_dtypes(backend, dtype, teacher):
    gen = make_gen("klqk_dtypes", backend, DTYPE_IDS[dtype], teacher)
    B, H, Hkv, M, N, D = 2, 2, 1, 9, 37, 32
    q = randn((B, H, M, D), gen, dtype, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, dtype, requires_grad=True)
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    if teacher == "dense":
        check_kl_qk(backend, q, k, make_target((B, 1, M, N), "logits", gen, dtype=dtype), target_is="logits",
                    temperature=1.5, key_mask=key_mask, gen=gen)
    else:
        target = implicit_teacher(B, M, N, 16, gen, dtype)
        check_kl_qk(backend, q, k, target, temperature=1.5, key_mask=key_mask, gen=gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_low_precision_student_fp32_teacher(backend, dtype):
    """A float32 implicit teacher (e.g. CLIP embeddings) with a float16/bfloat16 student."""
    gen = make_gen("klqk_mixed", backend, DTYPE_IDS[dtype])
    B, H, M, N = 1, 2, 7, 30
    q = randn((B, H, M, 16), gen, dtype, requires_grad=True)
    k = randn((B, H, N, 16), gen, dtype, requires_grad=True)
    check_kl_qk(backend, q, k, implicit_teacher(B, M, N, 24, gen), gen=gen)


INTERPRETER_COST = ("4 teachers x 4 heads x (M, N) = (19, 70) per dtype (~10 s there); test_dtypes covers "
                    "Triton's dtypes")


@pytest.mark.parametrize("teacher", ["dense_probs", "dense_logits", "implicit_1head", "implicit_Hheads"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(skip_interpreter=INTERPRETER_COST))
def test_dtypes_teachers(backend, dtype, teacher):
    """From the cuda backend's suite: every teacher kind in every dtype (GQA 4:2, a key mask, T = 0.7,
    a probability row without mass, an implicit teacher with one head or H heads in float32)."""
    gen = make_gen("klqk_dtypes_teachers", backend, DTYPE_IDS[dtype], teacher)
    B, H, Hkv, M, N, D = 2, 4, 2, 19, 70, 40
    q = randn((B, H, M, D), gen, dtype, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, dtype, requires_grad=True)
    key_mask = (torch.rand(B, 1, 1, N, generator=gen) < 0.7).to(DEVICE)
    kw = dict(temperature=0.7, key_mask=key_mask)
    if teacher == "dense_probs":
        target = torch.rand(B, 1, M, N, generator=gen)
        target[0, 0, 3] = 0.0
        target = target.to(DEVICE)
    elif teacher == "dense_logits":
        target = torch.randn(B, H, M, N, generator=gen).to(DEVICE)
        kw["target_is"] = "logits"
    else:
        Ht = 1 if teacher == "implicit_1head" else H
        target = (randn((B, Ht, M, 24), gen), randn((B, 1, N, 24), gen))
    check_kl_qk(backend, q, k, target, gen=gen, **kw)
