"""Differentiable backward formulas of the three ops, for double backward and torch.func.

The fused kernels compute each op's first-order gradients but are not themselves differentiable.
When a backward runs with grad mode on (``torch.autograd.grad(..., create_graph=True)``,
``gradgradcheck``, ``torch.func.grad`` / ``vjp``, which always build a differentiable backward), the
ops' backward functions call the formulas below instead: the same math written with differentiable
torch ops on the saved inputs, so autograd can differentiate the gradients again (and functorch can
batch them). They materialise the full (B, H, M, N) scores, as eager attention does; the fused
kernels stay the path of every ordinary backward (grad mode off), which is what training uses.

Math (per batch b, head h; S = scale Q K^T + mask, P = softmax(S) with 0 on rows that attend no key):
  dP = dO V^T + G (G: gradient of the returned maps, rows w_start:w_stop),
  dS = P * (dP - rowsum(P * dP)) + g * (P - t)     (g: gradient of the fused per-row KL),
  dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO,  dmask = dS summed to the mask's shape.
KL ops: dS = g * (softmax(s) - t) with s = student_scale * logits (or q k^T), no gradient to the target.
t is the target over the keys the student attends, renormalised there; rows without target mass
give 0. Computed in float32 (float64 for float64 inputs), returned in the inputs' dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lfi._numerics import compute_dtype
from lfi.backends.torch.attention_kl import log_target

NEG_INF = float("-inf")


def _expand_kv(t: Tensor, heads: int) -> Tensor:
    """(B, Hkv, N, X) -> (B, H, N, X): query head h reads kv head h // (H // Hkv)."""
    hkv = t.shape[1]
    return t if hkv == heads else t.repeat_interleave(heads // hkv, dim=1)


def _sum_kv(t: Tensor, hkv: int) -> Tensor:
    """(B, H, N, X) -> (B, Hkv, N, X): the sum over the query heads of each kv head."""
    return t if t.shape[1] == hkv else t.unflatten(1, (hkv, t.shape[1] // hkv)).sum(2)


def _sum_to(t: Tensor, shape) -> Tensor:
    """Sums a (B, H, M, N) tensor over the dims where `shape` has size 1 (a broadcast mask's)."""
    dims = [i for i, size in enumerate(shape) if size == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _probs(s: Tensor) -> Tensor:
    """softmax(s) over the last dim, 0 on rows whose every key is -inf (fully masked). The dead
    rows are set to 0 before the softmax too, so that no NaN enters the graph there (a NaN times
    a zero gradient is still NaN). NaN scores still propagate to their whole row, as in eager."""
    dead = (s == NEG_INF).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)


def _target_probs(target: Tensor, keep: Optional[Tensor], target_scale: float, is_logits: bool, dtype):
    """(t, has_mass): the target over the kept keys, renormalised there (the backends' log_target, so
    the same conventions for NaN, zero mass and masked keys), and whether the row has target mass.
    No gradient: the target is a teacher signal."""
    log_t, _, log_z = log_target(target.detach(), keep, target_scale, is_logits, dtype)
    return torch.exp(log_t), log_z > NEG_INF


def _kl_term(grad_kl: Tensor, p: Tensor, t: Tensor, has_mass: Tensor) -> Tensor:
    """g * (P - t) per row, zero on rows without target mass."""
    g = torch.where(has_mass, grad_kl.to(p.dtype)[..., None], torch.zeros((), dtype=p.dtype, device=p.device))
    return g * (p - t)


def attention_scores(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool, dtype) -> Tensor:
    """S = scale Q K^T + mask (-inf where a bool mask is False or causal masking removes the key),
    (B, H, M, N) in `dtype`, out of place (differentiable)."""
    s = torch.matmul(q.to(dtype), _expand_kv(k.to(dtype), q.shape[1]).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else s + mask.to(dtype)
    if is_causal:
        M, N = s.shape[-2], s.shape[-1]
        s = s.masked_fill(torch.ones(M, N, dtype=torch.bool, device=s.device).triu(1), NEG_INF)
    return s


def attention_backward(grad_out: Optional[Tensor], grad_weights: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                       mask: Optional[Tensor], scale: float, is_causal: bool, w_start: int, w_stop: int,
                       mask_grad: bool, kl_target: Optional[Tensor], grad_kl: Optional[Tensor]):
    """interaction_attention's (dq, dk, dv, dmask) as differentiable torch ops (see the module
    docstring). grad_out (B, H, M, Dv) or None (no loss on out); grad_weights (B, H, w_stop -
    w_start, N) or None; grad_kl (B, H, M) or None. dmask is None unless mask_grad."""
    dt = compute_dtype(q.dtype)
    H, hkv, M = q.shape[1], k.shape[1], q.shape[2]
    s = attention_scores(q, k, mask, scale, is_causal, dt)
    p = _probs(s)
    dp = dv = None
    if grad_out is not None:
        do = grad_out.to(dt)
        dp = torch.matmul(do, _expand_kv(v.to(dt), H).transpose(-1, -2))
        dv = _sum_kv(torch.matmul(p.transpose(-1, -2), do), hkv)
    if grad_weights is not None and w_stop > w_start:
        g = grad_weights.to(dt)
        if (w_start, w_stop) != (0, M):
            g = F.pad(g, (0, 0, w_start, M - w_stop))  # zero rows outside the returned window
        dp = g if dp is None else dp + g
    ds = torch.zeros_like(p) if dp is None else p * (dp - (p * dp).sum(-1, keepdim=True))
    if grad_kl is not None and kl_target is not None:
        t, has_mass = _target_probs(kl_target, s.detach() > NEG_INF, 1.0, False, dt)
        ds = ds + _kl_term(grad_kl, p, t, has_mass)
    dq = (torch.matmul(ds, _expand_kv(k.to(dt), H)) * scale).to(q.dtype)
    dk = (_sum_kv(torch.matmul(ds.transpose(-1, -2), q.to(dt)), hkv) * scale).to(k.dtype)
    dv = torch.zeros_like(v) if dv is None else dv.to(v.dtype)
    dmask = _sum_to(ds, mask.shape).to(mask.dtype) if mask_grad and mask is not None else None
    return dq, dk, dv, dmask


def kl_backward(grad_kl: Tensor, logits: Tensor, target: Tensor, key_mask: Optional[Tensor], student_scale: float,
                target_scale: float, target_is_logits: bool) -> Tensor:
    """attention_kl's dlogits (B, H, M, N) = g * (softmax(s) - t) * student_scale, differentiable."""
    dt = compute_dtype(logits.dtype)
    s = logits.to(dt) * student_scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask, NEG_INF)
    t, has_mass = _target_probs(target, key_mask, target_scale, target_is_logits, dt)
    return (_kl_term(grad_kl, _probs(s), t, has_mass) * student_scale).to(logits.dtype)


def kl_qk_backward(grad_kl: Tensor, q: Tensor, k: Tensor, target: Optional[Tensor], q_t: Optional[Tensor],
                   k_t: Optional[Tensor], key_mask: Optional[Tensor], student_scale: float, target_scale: float,
                   target_is_logits: bool):
    """attention_kl_qk's (dq, dk), differentiable: dS = g * (softmax(s) - t), s = student_scale q k^T;
    an implicit teacher gives target logits q_t k_t^T (times target_scale), without gradient."""
    dt = compute_dtype(q.dtype)
    H, hkv = q.shape[1], k.shape[1]
    kx = _expand_kv(k.to(dt), H)
    s = torch.matmul(q.to(dt), kx.transpose(-1, -2)) * student_scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask, NEG_INF)
    if q_t is not None:
        qt = q_t.detach().to(dt)
        target = torch.matmul(qt, _expand_kv(k_t.detach().to(dt), qt.shape[1]).transpose(-1, -2))
        target_is_logits = True
    t, has_mass = _target_probs(target, key_mask, target_scale, target_is_logits, dt)
    ds = _kl_term(grad_kl, _probs(s), t, has_mass)
    dq = (torch.matmul(ds, kx) * student_scale).to(q.dtype)
    dk = (_sum_kv(torch.matmul(ds.transpose(-1, -2), q.to(dt)), hkv) * student_scale).to(k.dtype)
    return dq, dk
