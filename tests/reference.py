"""Plain float64 eager reference for interaction_attention (the ground truth of the tests).

Everything is computed in float64 with ordinary differentiable torch ops, so gradients of the
reference (via torch.autograd) are the expected gradients. Query rows with no attended key give
zeros in both the output and the probabilities, and zero gradients.
"""
from __future__ import annotations

import torch


def reference_attention(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Returns (out, P) in float64.

    q (B, H, M, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) with H % Hkv == 0 (query head h uses kv
    head h // (H // Hkv)), or 3-D (B, L, D) tensors (single head; results are then 3-D too).
    attn_mask: None, bool (True = attend) or float (added to the scores), broadcastable to
    (B, H, M, N). is_causal: query i attends keys j <= i (top-left aligned), combined with the mask.
    out: (B, H, M, Dv); P: (B, H, M, N).
    """
    three_d = q.dim() == 3
    if three_d:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    B, H, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    assert H % Hkv == 0
    if scale is None:
        scale = D ** -0.5
    q64, k64, v64 = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    group = H // Hkv
    if group > 1:
        k64 = k64.repeat_interleave(group, dim=1)
        v64 = v64.repeat_interleave(group, dim=1)

    s = scale * torch.matmul(q64, k64.transpose(-1, -2))  # (B, H, M, N)
    allowed = torch.ones(B, H, M, N, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(torch.float64)
    if is_causal:
        causal = torch.ones(M, N, dtype=torch.bool, device=q.device).tril()
        allowed = allowed & causal
    s = s.masked_fill(~allowed, float("-inf"))
    row_ok = (s > float("-inf")).any(-1, keepdim=True)  # rows with at least one attended key
    s = torch.where(row_ok, s, torch.zeros_like(s))
    p = torch.softmax(s, dim=-1)
    p = torch.where(row_ok, p, torch.zeros_like(p))
    out = torch.matmul(p, v64)
    if three_d:
        out, p = out.squeeze(1), p.squeeze(1)
    return out, p


def reference_lse(q, k, attn_mask=None, is_causal=False, scale=None):
    """Row logsumexp of the masked scores, float64 (B, H, M); +inf for fully masked rows."""
    B, H, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if scale is None:
        scale = D ** -0.5
    k64 = k.to(torch.float64).repeat_interleave(H // Hkv, dim=1)
    s = scale * torch.matmul(q.to(torch.float64), k64.transpose(-1, -2))
    allowed = torch.ones(B, H, M, N, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(torch.float64)
    if is_causal:
        allowed = allowed & torch.ones(M, N, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)


def select_weights(p, weights_rows=None, average_attn_weights=False):
    """Applies the API's weights_rows / average_attn_weights to a full (B, H, M, N) map (or a 3-D
    (B, M, N) single-head map, for which averaging over heads changes nothing)."""
    if weights_rows is not None:
        start, stop = weights_rows
        p = p[..., start:stop, :]
    if average_attn_weights and p.dim() == 4:
        p = p.mean(1)
    return p
