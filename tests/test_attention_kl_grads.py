"""lfi.ops.attention_kl gradients and layouts: gradcheck (float64, torch), non-contiguous / broadcast
upstream gradients, no gradient to the target, no_grad mode, 2-D / 3-D and strided logits, broadcast
targets and masks; agreement between backends, backend="auto", the torch backend's row chunks. Against
the float64 references of tests/reference.py (how: tests/kl_cases.py).
"""
from __future__ import annotations

import pytest
import torch

from helpers import BACKENDS
from helpers import DEVICE
from helpers import assert_close
from helpers import case_params
from helpers import detached64
from helpers import make_gen
from helpers import randn
from kl_cases import TARGET_KINDS
from kl_cases import check_kl
from kl_cases import key_mask_of
from kl_cases import key_mask_with_empty_row
from kl_cases import make_target
from lfi.ops import attention_kl
from reference import ref_kl_rows

# --------------------------------------------------------------------------------------------------
# Gradients: gradcheck (float64, torch), non-contiguous / broadcast upstream gradients, no target grad
# --------------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    dict(id="probs_T1", target_is="probs", T=1.0, mask=False, reduction="none"),
    dict(id="probs_T05_mask_sum", target_is="probs", T=0.5, mask=True, reduction="sum"),
    dict(id="logits_T2_mask_batchmean", target_is="logits", T=2.0, mask=True, reduction="batchmean"),
    dict(id="log_probs_T2_mean", target_is="log_probs", T=2.0, mask=False, reduction="mean"),
]


@pytest.mark.parametrize("case", case_params(GRADCHECK_CASES))
def test_gradcheck_torch_fp64(case):
    gen = make_gen("kl_gradcheck", case["id"])
    B, H, M, N = 2, 2, 3, 7
    logits = randn((B, H, M, N), gen, torch.float64, requires_grad=True)
    target = make_target((B, 1, M, N), case["target_is"], gen, dtype=torch.float64)
    key_mask = None
    if case["mask"]:
        key_mask = key_mask_with_empty_row(B, M, N, gen, 0.6, row=1)

    def fn(lg):
        return attention_kl(lg, target, target_is=case["target_is"], temperature=case["T"],
                            reduction=case["reduction"], key_mask=key_mask, backend="torch")

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_noncontiguous_upstream_gradient(backend, layout):
    """grad_output for reduction='none' with unusual strides (transposed, or stride 0 from expand)."""
    gen = make_gen("kl_grad_layout", backend, layout)
    B, H, M, N = 2, 2, 5, 30
    logits = randn((B, H, M, N), gen, requires_grad=True)
    target = make_target((B, 1, M, N), "probs", gen)
    kl = attention_kl(logits, target, reduction="none", backend=backend)
    if layout == "transposed":
        r = randn((B, M, H), gen).transpose(1, 2)
    else:
        r = randn((B, 1, M), gen).expand(B, H, M)
    assert not r.is_contiguous()
    (got,) = torch.autograd.grad(kl, logits, r)
    (lg64,) = detached64(logits)
    (exp,) = torch.autograd.grad(ref_kl_rows(lg64, target), lg64, r.double())
    assert_close(got, exp, torch.float32, grad=True, name="dlogits")


def test_no_gradient_to_target(backend):
    gen = make_gen("kl_no_target_grad", backend)
    logits = randn((1, 2, 4, 20), gen, requires_grad=True)
    for target_is in TARGET_KINDS:
        target = make_target((1, 2, 4, 20), target_is, gen).requires_grad_(True)
        loss = attention_kl(logits, target, target_is=target_is, backend=backend)
        g_logits, g_target = torch.autograd.grad(loss, (logits, target), allow_unused=True)
        assert g_logits is not None and g_logits.abs().sum() > 0
        assert g_target is None or (g_target == 0).all(), f"{target_is}: the target must not receive a gradient"


def test_no_grad_mode_and_detached(backend):
    gen = make_gen("kl_no_grad", backend)
    logits = randn((2, 2, 4, 25), gen)
    target = make_target((2, 1, 4, 25), "probs", gen)
    with torch.no_grad():
        a = attention_kl(logits, target, reduction="none", backend=backend)
    b = attention_kl(logits, target, reduction="none", backend=backend)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# Layouts: 2-D / 3-D logits, non-contiguous logits, broadcast (stride-0) targets and masks
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
def test_fewer_dims(backend, ndim):
    """(M, N) and (H, M, N) logits: rows over the last dim; 'none' keeps the leading dims and
    'batchmean' divides by the first dim (as F.kl_div)."""
    gen = make_gen("kl_ndim", backend, ndim)
    shape = (6, 27) if ndim == 2 else (3, 5, 27)
    logits = randn(shape, gen, requires_grad=True)
    target = make_target(shape, "logits", gen)
    kl, _ = check_kl(backend, logits, target, target_is="logits", temperature=2.0, gen=gen)
    assert kl.shape == shape[:-1]
    bm = attention_kl(logits, target, target_is="logits", temperature=2.0, backend=backend)
    assert_close(bm, kl.detach().double().sum() / shape[0], torch.float32, grad=True, name="batchmean")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_target_mask"])
def test_noncontiguous_inputs(backend, layout):
    gen = make_gen("kl_noncontig", backend, layout)
    B, H, M, N = 2, 2, 7, 33
    key_mask = None
    if layout == "transposed":
        base = randn((B, N, H, M), gen, requires_grad=True)
        logits = base.permute(0, 2, 3, 1)
        target = make_target((B, H, N, M), "logits", gen).transpose(-1, -2)
        target_is = "logits"
    elif layout == "sliced":
        base = randn((B, 2 * H, M, N + 9), gen, requires_grad=True)
        logits = base[:, ::2, :, 4:4 + N]
        target = make_target((B, 1, M, N + 3), "probs", gen)[..., :N]
        target_is = "probs"
    else:
        base = randn((B, H, M, N), gen, requires_grad=True)
        logits = base
        target = make_target((1, 1, M, N), "probs", gen).expand(B, H, M, N)
        key_mask = (torch.rand(N, generator=gen) < 0.7).to(DEVICE).expand(B, H, M, N)
        target_is = "probs"
    kl = attention_kl(logits, target, target_is=target_is, key_mask=key_mask, reduction="none", backend=backend)
    (lg64,) = detached64(logits)
    want = ref_kl_rows(lg64, target, target_is, 1.0, key_mask)
    assert_close(kl, want, torch.float32, grad=True, name="kl rows")
    r = randn(kl.shape, gen)
    (got,) = torch.autograd.grad(kl, base, r)
    (exp,) = torch.autograd.grad(want, lg64, r.double())
    exp_base = torch.zeros(base.shape, dtype=torch.float64, device=DEVICE)
    if layout == "transposed":
        exp_base = exp.permute(0, 3, 1, 2)
    elif layout == "sliced":
        exp_base[:, ::2, :, 4:4 + N] = exp
    else:
        exp_base = exp
    assert_close(got, exp_base, torch.float32, grad=True, name="grad")


def test_backends_agree():
    if len(BACKENDS) < 2:
        pytest.skip("only the torch backend is usable here")
    gen = make_gen("kl_agree")
    logits = randn((2, 2, 9, 41), gen, scale=2.0)
    target = make_target((2, 1, 9, 41), "logits", gen)
    key_mask = key_mask_of("B11N", 2, 2, 9, 41, gen)
    res = [attention_kl(logits, target, target_is="logits", temperature=0.5, reduction="none", key_mask=key_mask,
                        backend=b) for b in BACKENDS]
    for b, r in zip(BACKENDS[1:], res[1:]):
        torch.testing.assert_close(r, res[0], atol=2e-5, rtol=2e-5, msg=lambda m: f"{b} vs torch: {m}")


def test_auto_backend(monkeypatch):
    gen = make_gen("kl_auto")
    logits = randn((1, 2, 4, 20), gen)
    target = make_target((1, 1, 4, 20), "probs", gen)
    want = ref_kl_rows(logits.double(), target)
    assert_close(attention_kl(logits, target, reduction="none"), want, torch.float32, grad=True, name="auto")
    for b in BACKENDS:
        monkeypatch.setenv("LFI_BACKEND", b)
        assert_close(attention_kl(logits, target, reduction="none"), want, torch.float32, grad=True, name=b)


@pytest.mark.parametrize("chunk_bytes", ["1", "3000"], ids=["1row", "few_rows"])
def test_torch_backend_row_chunks(monkeypatch, chunk_bytes):
    """The torch backend computes in row chunks (LFI_TORCH_CHUNK_BYTES): same values and gradients."""
    monkeypatch.setenv("LFI_TORCH_CHUNK_BYTES", chunk_bytes)
    gen = make_gen("kl_chunks", chunk_bytes)
    B, H, M, N = 2, 2, 11, 23
    logits = randn((B, H, M, N), gen, requires_grad=True)
    target = make_target((B, 1, 1, N), "probs", gen)
    key_mask = key_mask_of("11MN", B, H, M, N, gen)
    check_kl("torch", logits, target, key_mask=key_mask, temperature=2.0, gen=gen)
