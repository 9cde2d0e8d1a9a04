"""PyTorch reference backend: exact attention with maps, in row chunks so memory stays bounded.

Works on any device. Computes in float32 (float64 for float64 inputs). Without maps, the largest
temporary is one chunk of scores of about LFI_TORCH_CHUNK_BYTES (default 64 MiB), never the full
(B, H, M, N) matrix. Shapes: q (B, H, M, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), mask 4-D and
broadcastable to (B, H, M, N).
"""
from __future__ import annotations

import os

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(B: int, H: int, M: int, N: int, itemsize: int) -> int:
    budget = int(os.environ.get("LFI_TORCH_CHUNK_BYTES", 64 << 20))
    # A chunk holds about three (B, H, rows, N) temporaries (scores, probabilities, gradients).
    return max(1, min(M, budget // (3 * B * H * N * itemsize)))


def _grouped(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H, R, X) -> (B, Hkv, G, R, X), a view."""
    return t.unflatten(1, (hkv, t.shape[1] // hkv))


def _scores(q_rows, k, mask, scale, is_causal, r0, r1, dtype):
    """Masked scores for query rows r0:r1: (B, H, r1-r0, N) in `dtype`."""
    B, H = q_rows.shape[:2]
    hkv, N = k.shape[1], k.shape[2]
    s = torch.matmul(_grouped(q_rows.to(dtype), hkv), k.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)
    s = s * scale
    if mask is not None:
        m = mask[:, :, r0:r1] if mask.shape[2] != 1 else mask
        if m.dtype == torch.bool:
            s = s.masked_fill(~m, float("-inf"))
        else:
            s = s + m.to(dtype)
    if is_causal:
        rows = torch.arange(r0, r1, device=s.device)[:, None]
        cols = torch.arange(N, device=s.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def _lse(s: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp, +inf for rows with no unmasked key (so exp(s - lse) is 0 there)."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    lse = m + torch.log(torch.exp(s - m).sum(-1, keepdim=True))
    return torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)


def _overlap(r0: int, r1: int, w0: int, w1: int):
    a, b = max(r0, w0), min(r1, w1)
    return (a, b) if a < b else None


def attention_forward(q, k, v, mask, scale: float, is_causal: bool, w_start: int, w_stop: int):
    """Returns out (B, H, M, Dv) in q.dtype, lse (B, H, M) in float32 (float64 for float64 input),
    and weights (B, H, w_stop - w_start, N) in q.dtype: exact softmax rows w_start:w_stop."""
    B, H, M, _ = q.shape
    hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dt = compute_dtype(q.dtype)
    out = q.new_empty(B, H, M, Dv)
    lse = torch.empty(B, H, M, dtype=dt if dt == torch.float64 else torch.float32, device=q.device)
    weights = q.new_empty(B, H, w_stop - w_start, N)
    k_, v_ = k.to(dt), v.to(dt).unsqueeze(2)
    step = _chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        s = _scores(q[:, :, r0:r1], k_, mask, scale, is_causal, r0, r1, dt)
        lse_rows = _lse(s)
        p = torch.exp(s - lse_rows)
        out[:, :, r0:r1] = torch.matmul(_grouped(p, hkv), v_).flatten(1, 2).to(q.dtype)
        lse[:, :, r0:r1] = lse_rows.squeeze(-1)
        rows = _overlap(r0, r1, w_start, w_stop)
        if rows is not None:
            a, b = rows
            weights[:, :, a - w_start : b - w_start] = p[:, :, a - r0 : b - r0]
    return out, lse, weights


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sums a (B, H, R, N) tensor over the dims where `shape` has size 1."""
    dims = [i for i, size in enumerate(shape) if size == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def attention_backward(grad_out, grad_weights, q, k, v, out, lse, mask, scale: float, is_causal: bool,
                       w_start: int, w_stop: int, mask_grad: bool):
    """Gradients (dq, dk, dv, dmask) given dL/dout (B, H, M, Dv) and dL/dweights (B, H, R, N) or None.

    dP = dO V^T + G, delta = rowsum(dO * O) + rowsum(P * G), dS = P (dP - delta),
    dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO; dmask = dS summed to the mask's shape.
    """
    B, H, M, _ = q.shape
    hkv, N = k.shape[1], k.shape[2]
    dt = compute_dtype(q.dtype)
    k_dt = k.to(dt)
    k_, v_ = k_dt.unsqueeze(2), v.to(dt).unsqueeze(2)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    dv = torch.zeros(v.shape, dtype=dt, device=q.device)
    dmask = torch.zeros(mask.shape, dtype=dt, device=q.device) if mask_grad else None
    step = _chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        q_rows = q[:, :, r0:r1].to(dt)
        p = torch.exp(_scores(q_rows, k_dt, mask, scale, is_causal, r0, r1, dt) - lse[:, :, r0:r1, None].to(dt))
        do = grad_out[:, :, r0:r1].to(dt)
        dv += torch.matmul(_grouped(p, hkv).transpose(-1, -2), _grouped(do, hkv)).sum(2)
        dp = torch.matmul(_grouped(do, hkv), v_.transpose(-1, -2)).flatten(1, 2)
        delta = (do * out[:, :, r0:r1].to(dt)).sum(-1, keepdim=True)
        rows = _overlap(r0, r1, w_start, w_stop) if grad_weights is not None else None
        if rows is not None:
            a, b = rows
            g = grad_weights[:, :, a - w_start : b - w_start].to(dt)
            dp[:, :, a - r0 : b - r0] += g
            delta[:, :, a - r0 : b - r0] += (p[:, :, a - r0 : b - r0] * g).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq[:, :, r0:r1] = (torch.matmul(_grouped(ds, hkv), k_).flatten(1, 2) * scale).to(q.dtype)
        dk += torch.matmul(_grouped(ds, hkv).transpose(-1, -2), _grouped(q_rows, hkv)).sum(2) * scale
        if dmask is not None:
            part = _sum_to(ds, mask.shape)
            if mask.shape[2] == 1:
                dmask += part
            else:
                dmask[:, :, r0:r1] += part
    return dq, dk.to(k.dtype), dv.to(v.dtype), (dmask.to(mask.dtype) if dmask is not None else None)


def attention_with_dropout(q, k, v, mask, scale: float, is_causal: bool, dropout_p: float,
                           w_start: int, w_stop: int):
    """Differentiable eager attention with dropout on P (weights returned are pre-dropout).

    Holds the full (B, H, M, N) probabilities for autograd: dropout is not fused anywhere.
    """
    hkv = k.shape[1]
    dt = compute_dtype(q.dtype)
    s = _scores(q, k.to(dt), mask, scale, is_causal, 0, q.shape[2], dt)
    p = torch.exp(s - _lse(s))
    p_drop = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = torch.matmul(_grouped(p_drop, hkv), v.to(dt).unsqueeze(2)).flatten(1, 2).to(q.dtype)
    return out, p[:, :, w_start:w_stop].to(q.dtype)
