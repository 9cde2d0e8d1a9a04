"""Helpers of the CUDA-emulator tests (tests/test_cuda_emulator.py, tests/test_cuda_extension.py):
run one attention or attention_kl_qk case through the emulated kernels (``torch.ops.lfi_C_emu``) and
the float64 PyTorch reference, and compare.
"""
from __future__ import annotations

import torch

from lfi.backends.torch import attention_kl_qk as RQ
from lfi.backends.torch import interaction_attention as R


def close(got, want, atol, rtol, name):
    """got matches want (float64 reference): the same inf / nan pattern and values, the finite
    entries within atol + rtol |want|."""
    got, want = got.double(), want.double()
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), f"{name}: inf / nan pattern differs"
    torch.testing.assert_close(got[~fin], want[~fin], atol=0, rtol=0, equal_nan=True, msg=f"{name}: inf / nan differ")
    torch.testing.assert_close(got[fin], want[fin], atol=atol, rtol=rtol, msg=name)


def _f64(t):
    if t is None:
        return None
    return t if t.dtype == torch.bool else t.double()


def attention_fwd(emu, q, k, v, mask, target, scale, causal, rows):
    """(got, want): the five forward outputs (out, stats, weights, kl, tnorm) of the emulated kernels
    and of the float64 reference."""
    want = R.attention_forward(q.double(), k.double(), v.double(), _f64(mask), scale, causal, *rows, _f64(target))
    got = emu.attention_fwd(q, k, v, mask, scale, causal, *rows, target)
    return list(got), want


def attention_bwd(emu, got, want, q, k, v, mask, target, scale, causal, rows, go, gw, gkl):
    """(got_g, want_g): (dq, dk, dv, dmask) of the emulated backward (from the emulated forward's
    outputs `got`) and of the float64 reference (from `want`); dmask only for a float mask."""
    mask_grad = mask is not None and mask.dtype != torch.bool
    want_g = R.attention_backward(go.double(), _f64(gw), q.double(), k.double(), v.double(), want[0], want[1],
                                  _f64(mask), scale, causal, *rows, mask_grad, _f64(target), want[4], gkl)
    got_g = emu.attention_bwd(go, gw, q, k, v, got[0], got[1], mask, scale, causal, *rows, mask_grad, target,
                              got[4] if target is not None else None, gkl)
    return got_g, want_g


def check_kl_qk(emu, q, k, target, q_t, k_t, key_mask, g, student_scale, target_scale, logits, fwd_tol, bwd_tol):
    """attention_kl_qk forward (kl, stats, tstats) and backward (dq, dk) of the emulated kernels
    against the float64 reference; the backward runs from the emulated forward's statistics."""
    d = _f64
    want = RQ.kl_qk_forward(d(q), d(k), d(target), d(q_t), d(k_t), key_mask, student_scale, target_scale, logits)
    got = emu.kl_qk_fwd(q, k, target, q_t, k_t, key_mask, student_scale, target_scale, logits)
    for name, a, b in zip(("kl", "stats", "tstats"), got, want):
        close(a, b, fwd_tol, fwd_tol, name)
    want_g = RQ.kl_qk_backward(d(g), d(q), d(k), d(target), d(q_t), d(k_t), key_mask, want[1], want[2],
                               student_scale, target_scale, logits)
    got_g = emu.kl_qk_bwd(g, q, k, target, q_t, k_t, key_mask, got[1], got[2], student_scale, target_scale, logits)
    for name, a, b in zip(("dq", "dk"), got_g, want_g):
        close(a, b, bwd_tol, bwd_tol, name)
