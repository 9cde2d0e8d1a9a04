"""lfi.ops.attention_kl_qk gradients and layouts: gradcheck (float64, torch), no gradient to the
teacher, partial requires_grad, strided q / k and teachers, and the torch backend's row chunks (the
full (M, N) logits map is never built). Against the float64 references of tests/reference.py (how:
tests/kl_cases.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close
from helpers import detached64
from helpers import make_gen
from helpers import randn
from kl_cases import check_kl_qk
from kl_cases import implicit_teacher
from kl_cases import key_mask_of
from kl_cases import key_mask_with_empty_row
from kl_cases import make_target
from lfi.ops import attention_kl_qk
from reference import ref_kl_qk_rows

# --------------------------------------------------------------------------------------------------
# Gradients: gradcheck (float64, torch), no gradient to the teacher
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["dense_probs", "dense_logits", "implicit"])
def test_gradcheck_torch_fp64(teacher):
    gen = make_gen("klqk_gradcheck", teacher)
    B, H, Hkv, M, N, D = 1, 2, 1, 3, 6, 4
    q = randn((B, H, M, D), gen, torch.float64, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, torch.float64, requires_grad=True)
    key_mask = key_mask_with_empty_row(B, M, N, gen, 0.7, row=1)
    kw = dict(temperature=1.3, key_mask=key_mask, reduction="sum", backend="torch")
    if teacher == "implicit":
        target = implicit_teacher(B, M, N, 3, gen, torch.float64)
    else:
        target = make_target((B, 1, M, N), teacher.split("_")[1], gen, dtype=torch.float64)
        kw["target_is"] = teacher.split("_")[1]

    def fn(q_, k_):
        return attention_kl_qk(q_, k_, target, **kw)

    assert torch.autograd.gradcheck(fn, (q, k), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_no_gradient_to_teacher(backend):
    gen = make_gen("klqk_no_teacher_grad", backend)
    B, H, M, N, D = 1, 2, 4, 20, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, H, N, D), gen, requires_grad=True)
    target = make_target((B, 1, M, N), "probs", gen).requires_grad_(True)
    q_t = randn((B, 1, M, 8), gen, requires_grad=True)
    k_t = randn((B, 1, N, 8), gen, requires_grad=True)
    for tgt, extra in ((target, (target,)), ((q_t, k_t), (q_t, k_t))):
        loss = attention_kl_qk(q, k, tgt, backend=backend)
        grads = torch.autograd.grad(loss, (q, k) + extra, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
        for g in grads[2:]:
            assert g is None or (g == 0).all(), "the teacher must not receive a gradient"


@pytest.mark.parametrize("which", ["q", "k"])
def test_partial_requires_grad(backend, which):
    gen = make_gen("klqk_partial", backend, which)
    q = randn((1, 2, 5, 16), gen, requires_grad=which == "q")
    k = randn((1, 1, 21, 16), gen, requires_grad=which == "k")
    check_kl_qk(backend, q, k, make_target((1, 1, 5, 21), "probs", gen), gen=gen)


# --------------------------------------------------------------------------------------------------
# Layouts: strided q / k (packed projections), expanded batch, broadcast masks
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["packed_qkv", "expanded_batch_k"])
def test_noncontiguous(backend, layout):
    gen = make_gen("klqk_noncontig", backend, layout)
    B, H, M, D = 2, 2, 9, 16
    if layout == "packed_qkv":
        base = [randn((B, M, 3, H, D), gen, requires_grad=True)]
        q, k, _ = base[0].permute(2, 0, 3, 1, 4).unbind(0)
        N = M
    else:
        N = 26
        base = [randn((B, H, M, D), gen, requires_grad=True), randn((1, 1, N, D), gen, requires_grad=True)]
        q, k = base[0], base[1].expand(B, 1, N, D)
    # a teacher with strided q_t (column-major storage) and k_t (heads not outermost)
    target = (randn((B, 1, 8, M), gen).transpose(-1, -2), randn((B, N, 1, 8), gen).transpose(1, 2))
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    kl = attention_kl_qk(q, k, target, reduction="none", key_mask=key_mask, temperature=0.5, backend=backend)
    bases64 = detached64(*base)
    if layout == "packed_qkv":
        q64, k64, _ = bases64[0].permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q64, k64 = bases64[0], bases64[1].expand(B, 1, N, D)
    want = ref_kl_qk_rows(q64, k64, target, key_mask=key_mask, temperature=0.5)
    assert_close(kl, want, torch.float32, grad=True, name="kl rows")
    r = randn(kl.shape, gen)
    got = torch.autograd.grad(kl, base, r)
    exp = torch.autograd.grad(want, bases64, r.double())
    for g, e in zip(got, exp):
        assert_close(g, e, torch.float32, grad=True, name="grad")


# --------------------------------------------------------------------------------------------------
# Memory: the torch backend works in row chunks of at most LFI_TORCH_CHUNK_BYTES
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["dense", "implicit"])
@pytest.mark.parametrize("chunk_bytes", [1, 6000], ids=["1row", "few_rows"])
def test_torch_backend_row_chunks(monkeypatch, chunk_bytes, teacher):
    """With a small LFI_TORCH_CHUNK_BYTES the torch backend still matches the reference, and never
    builds a logits block larger than the chunk (the full (M, N) map is never materialized)."""
    from lfi.backends.torch import attention_kl_qk as ref_backend
    from lfi.backends.torch._common import chunk_rows

    monkeypatch.setenv("LFI_TORCH_CHUNK_BYTES", str(chunk_bytes))
    seen = []
    orig = ref_backend._logits

    def spy(q_rows, k, scale):
        out = orig(q_rows, k, scale)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(ref_backend, "_logits", spy)
    gen = make_gen("klqk_chunks", chunk_bytes, teacher)
    B, H, Hkv, M, N, D = 2, 2, 1, 23, 19, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, requires_grad=True)
    target = make_target((B, 1, M, N), "probs", gen) if teacher == "dense" else \
        implicit_teacher(B, M, N, 8, gen)
    check_kl_qk("torch", q, k, target, key_mask=key_mask_of("11MN", B, H, M, N, gen), temperature=2.0, gen=gen)
    step = chunk_rows(B, H, M, N, 4)
    assert step < M, "the test must exercise several chunks"
    assert seen, "the torch backend did not compute logits through _logits"
    assert max(s[2] for s in seen) <= step, f"row chunks larger than the budget allows: {sorted(set(seen))}"
    assert all(math.prod(s) < B * H * M * N for s in seen), "a full (B, H, M, N) logits map was built"
