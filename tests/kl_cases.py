"""Data builders and checks shared by the KL suites: attention_kl (test_attention_kl_*.py),
attention_kl_qk (test_attention_kl_qk_*.py) and the KL fused into the attention pass
(test_fused_kl.py); imported after conftest.py set TRITON_INTERPRET.

How those suites test: every backend of the matrix (helpers.BACKEND_PARAMS) is compared, over whole
tensors, against the float64 references of tests/reference.py computed from the same (rounded)
inputs: ``ref_kl_rows`` (F.log_softmax + F.kl_div) and its closed-form twin ``ref_kl_rows_direct``
for attention_kl; ``ref_kl_qk_rows`` for attention_kl_qk, which *does* materialize the logits
scale * q k^T (and scale_t * q_t k_t^T for an implicit teacher) that the op never builds.
Gradients (to the logits; to q and k only for attention_kl_qk) are compared against torch.autograd
through the reference (``check_kl``, ``check_kl_qk``). Shapes stay small: under the Triton CPU
interpreter every tile step costs milliseconds.
"""
from __future__ import annotations

import torch

from helpers import DEVICE
from helpers import assert_close
from helpers import detached64
from helpers import randn

REDUCTIONS = ["none", "sum", "mean", "batchmean"]
TARGET_KINDS = ["probs", "logits", "log_probs"]


def make_target(shape, target_is, gen, dtype=torch.float32, device=DEVICE, normalized=True):
    """A teacher tensor of the given kind: probabilities (rows summing to 1 unless normalized=False),
    logits or log-probabilities."""
    if target_is == "probs":
        t = torch.rand(*shape, generator=gen, dtype=torch.float32) + 0.01
        if normalized:
            t = t / t.sum(-1, keepdim=True)
    elif target_is == "logits":
        t = torch.randn(*shape, generator=gen, dtype=torch.float32) * 2.0
    else:
        t = torch.log_softmax(torch.randn(*shape, generator=gen, dtype=torch.float32) * 2.0, -1)
    return t.to(device=device, dtype=dtype)


def target_shape(kind, B, H, M, N):
    """The shape of a dense target broadcast against (B, H, M, N) scores, by name: "B1MN" (one map
    per image), "BHMN" (one per head), "111N" (one row for everything), "MN" (2-D)."""
    return {"B1MN": (B, 1, M, N), "BHMN": (B, H, M, N), "111N": (1, 1, 1, N), "MN": (M, N)}[kind]


def implicit_teacher(B, M, N, Dt, gen, dtype=torch.float32, heads=1, kv_heads=1):
    """An implicit teacher (q_t (B, heads, M, Dt), k_t (B, kv_heads, N, Dt)) for attention_kl_qk."""
    return randn((B, heads, M, Dt), gen, dtype), randn((B, kv_heads, N, Dt), gen, dtype)


def key_mask_of(kind, B, H, M, N, gen, device=DEVICE):
    """Key masks in several broadcast shapes (True = keep)."""
    if kind is None:
        return None
    shapes = {"N": (N,), "B11N": (B, 1, 1, N), "11MN": (1, 1, M, N), "BHMN": (B, H, M, N), "1H1N": (1, H, 1, N)}
    mask = torch.rand(*shapes[kind], generator=gen) < 0.7
    mask[..., 0] = True  # at least one kept key in (nearly) every row; fully masked rows are tested apart
    return mask.to(device)


def key_mask_with_empty_row(B, M, N, gen, p_true, row):
    """A (B, 1, M, N) key mask keeping key 0 in every row except `row` of the first batch element,
    which keeps no key (its KL and gradient must be 0)."""
    key_mask = torch.rand(B, 1, M, N, generator=gen) < p_true
    key_mask[..., 0] = True
    key_mask[0, 0, row] = False
    return key_mask.to(DEVICE)


def check_kl(backend, logits, target, *, target_is="probs", temperature=1.0, key_mask=None, gen,
             dtype=None, upstream="random"):
    """attention_kl(reduction="none") against both float64 references (same rounded inputs), and the
    gradient of a loss with a random (or all-ones) upstream gradient against the reference autograd.
    Returns (per-row kl, dlogits)."""
    from lfi.ops import attention_kl  # imported late: conftest.py sets TRITON_INTERPRET first
    from reference import ref_kl_rows
    from reference import ref_kl_rows_direct

    dtype = dtype or logits.dtype
    kl = attention_kl(logits, target, target_is=target_is, temperature=temperature, reduction="none",
                      key_mask=key_mask, backend=backend)
    assert kl.shape == logits.shape[:-1]
    assert kl.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert kl.device == logits.device
    (lg64,) = detached64(logits)
    want = ref_kl_rows(lg64, target, target_is, temperature, key_mask)
    want_direct = ref_kl_rows_direct(lg64, target, target_is, temperature, key_mask)
    torch.testing.assert_close(want, want_direct, atol=1e-9 * max(1.0, want.abs().max().item()), rtol=1e-9)
    assert_close(kl, want, dtype, grad=True, name="kl rows")
    assert_close(kl, want_direct, dtype, grad=True, name="kl rows (direct formula)")
    if not logits.requires_grad:
        return kl, None
    r = randn(kl.shape, gen, kl.dtype, kl.device) if upstream == "random" else torch.ones_like(kl)
    (got,) = torch.autograd.grad(kl, logits, r)
    (exp,) = torch.autograd.grad(want, lg64, r.double())
    assert got.dtype == logits.dtype and got.shape == logits.shape
    assert_close(got, exp, dtype, grad=True, name="dlogits")
    return kl, got


def check_kl_qk(backend, q, k, target, *, gen, dtype=None, upstream="random", **kw):
    """attention_kl_qk(reduction="none") vs both references on the same (rounded) inputs, and the
    gradients to q and k of a loss with a random upstream gradient. Returns (kl, dq, dk)."""
    from lfi.ops import attention_kl_qk  # imported late: conftest.py sets TRITON_INTERPRET first
    from reference import ref_kl_qk_rows

    dtype = dtype or q.dtype
    kl = attention_kl_qk(q, k, target, reduction="none", backend=backend, **kw)
    B, H, M, _ = q.shape
    assert kl.shape == (B, H, M)
    assert kl.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    q64, k64 = detached64(q, k)
    want = ref_kl_qk_rows(q64, k64, target, **kw)
    want_direct = ref_kl_qk_rows(q64, k64, target, direct=True, **kw)
    torch.testing.assert_close(want.detach(), want_direct, atol=1e-9 * max(1.0, want.abs().max().item()), rtol=1e-9)
    assert_close(kl, want, dtype, grad=True, name="kl rows")
    assert_close(kl, want_direct, dtype, grad=True, name="kl rows (direct formula)")
    inputs = [t for t in (q, k) if t.requires_grad]
    if not inputs:
        return kl, None, None
    r = randn(kl.shape, gen, kl.dtype, kl.device) if upstream == "random" else torch.ones_like(kl)
    got = torch.autograd.grad(kl, inputs, r)
    exp = torch.autograd.grad(want, [t64 for t, t64 in zip((q, k), (q64, k64)) if t.requires_grad], r.double())
    names = [n for n, t in zip("qk", (q, k)) if t.requires_grad]
    grads = {}
    for n, t, g, e in zip(names, inputs, got, exp):
        assert g.dtype == t.dtype and g.shape == t.shape, f"d{n}: {g.dtype} {tuple(g.shape)}"
        assert_close(g, e, dtype, grad=True, name=f"d{n}")
        grads[n] = g
    return kl, grads.get("q"), grads.get("k")


def check_reduced_loss(loss, want, inputs, refs, weight, *, names):
    """A reduced float32 KL `loss` against its float64 reference `want` (computed from `refs`, the
    float64 twins of `inputs`), and the gradients to `inputs` of (loss * weight).sum() against those of
    the reference: a float weight makes grad_output != 1, a tensor one weights the rows of
    reduction="none". Returns the gradients."""
    assert loss.shape == want.shape and loss.dtype == torch.float32
    assert_close(loss, want, torch.float32, grad=True, name="kl")
    w64 = weight if isinstance(weight, float) else weight.double()
    got = torch.autograd.grad((loss * weight).sum(), inputs)
    exp = torch.autograd.grad((want * w64).sum(), refs)
    for n, g, e in zip(names, got, exp):
        assert_close(g, e, torch.float32, grad=True, name=f"d{n}")
    return got
