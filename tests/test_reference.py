"""The float64 reference itself (tests/reference.py) agrees with torch SDPA where SDPA is defined,
and gives zeros (not NaN) on fully masked rows: the other suites rely on it as ground truth."""
import pytest
import torch
import torch.nn.functional as F

from helpers import bool_mask
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from reference import reference_attention
from reference import reference_lse
from reference import select_weights


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("MN", [(6, 6), (5, 13), (13, 5)], ids=lambda x: f"M{x[0]}_N{x[1]}")
def test_reference_matches_sdpa(MN, causal, mask_kind):
    M, N = MN
    gen = make_gen("ref_sdpa", MN, causal, mask_kind)
    q, k, v = make_qkv(2, 4, 2, M, N, 8, 12, dtype=torch.float64, gen=gen, device="cpu")
    mask = None
    if mask_kind == "bool":
        mask = bool_mask((2, 1, M, N), gen, p_true=0.8, device="cpu")
        mask[..., 0] = True  # SDPA gives NaN on fully masked rows; keep every row alive here
    elif mask_kind == "float":
        mask = float_mask((M, N), gen, dtype=torch.float64, device="cpu")
    out, p = reference_attention(q, k, v, mask, is_causal=causal, scale=0.7)
    sdpa_mask, sdpa_causal = mask, causal
    if causal and mask is not None:  # SDPA takes one or the other: fold the causal part into the mask
        tril = torch.ones(M, N, dtype=torch.bool).tril()
        sdpa_mask = mask & tril if mask.dtype == torch.bool else mask.masked_fill(~tril, float("-inf"))
        sdpa_causal = False
    want = F.scaled_dot_product_attention(q, k, v, sdpa_mask, is_causal=sdpa_causal, scale=0.7, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, M, dtype=torch.float64), atol=1e-12, rtol=0)
    lse = reference_lse(q, k, mask, is_causal=causal, scale=0.7)
    assert torch.isfinite(lse).all()


def test_reference_fully_masked_rows_and_grads():
    gen = make_gen("ref_dead")
    q, k, v = make_qkv(1, 2, 2, 4, 6, 8, dtype=torch.float64, gen=gen, device="cpu", requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    out, p = reference_attention(q, k, v, mask)
    assert (out[:, :, 2] == 0).all() and (p[:, :, 2] == 0).all()
    (out.sum() + (p * torch.randn(p.shape, generator=gen, dtype=torch.float64)).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, 2] == 0).all()
    assert torch.isinf(reference_lse(q, k, mask)[:, :, 2]).all()
    # gradcheck of the reference with a float mask that has -inf entries
    fm = torch.zeros(4, 6, dtype=torch.float64)
    fm[1] = float("-inf")
    fm[3, :2] = float("-inf")
    qs, ks, vs = (t.detach()[:, :, :3].clone().requires_grad_(True) for t in (q, k, v))
    torch.autograd.gradcheck(lambda a, b, c: reference_attention(a, b, c, fm[:3, :3]), (qs, ks, vs))


def test_select_weights():
    p = torch.rand(2, 3, 5, 4, dtype=torch.float64)
    assert select_weights(p, (1, 4)).shape == (2, 3, 3, 4)
    torch.testing.assert_close(select_weights(p, (1, 4), True), p[:, :, 1:4].mean(1))
    assert select_weights(p[:, 0], None, True).shape == (2, 5, 4)
