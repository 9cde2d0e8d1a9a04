"""PyTorch reference backend: exact attention with maps, in row chunks so memory stays bounded.

Works on any device. Computes in float32 (float64 for float64 inputs). Without maps, the largest
temporary is one chunk of scores of about LFI_TORCH_CHUNK_BYTES (default 64 MiB), never the full
(B, H, M, N) matrix. Shapes: q (B, H, M, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), mask and
kl_target 4-D and broadcastable to (B, H, M, N).
"""
from __future__ import annotations

import torch

from lfi.backends.reference._common import chunk_rows, compute_dtype, grouped, row_stats, rows_of
from lfi.backends.reference.attention_kl import kl_grad, kl_rows, log_target


def _scores(q_rows, k, mask, scale, is_causal, r0, r1, dtype):
    """Masked scores for query rows r0:r1: (B, H, r1-r0, N) in `dtype`, a fresh tensor that callers
    may overwrite (the mask and the scale are applied in place: no extra full-size temporaries)."""
    hkv, N = k.shape[1], k.shape[2]
    # scale q (R x D) rather than the scores (R x N): fewer multiplies, same result to an ulp
    s = torch.matmul(grouped(q_rows.to(dtype) * scale, hkv), k.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)
    m = rows_of(mask, r0, r1)
    if m is not None:
        if m.dtype == torch.bool:
            s.masked_fill_(~m, float("-inf"))
        else:
            s.add_(m.to(dtype))
    if is_causal:
        rows = torch.arange(r0, r1, device=s.device)[:, None]
        cols = torch.arange(N, device=s.device)[None, :]
        s.masked_fill_(cols > rows, float("-inf"))
    return s


def _softmax_rows(s, may_have_dead_rows: bool):
    """(p, m, log_l): p = softmax(s) over the last dim, exactly 0 on rows without an attended key;
    the row max m (0 there) and log l, l = sum exp(s - m) (+inf there), each (..., 1).

    torch.softmax is one vectorised pass; l is read back from the row max's own probability,
    exp(0) / l, instead of a second exp pass (accurate to an ulp of log l). Rows without an attended
    key (all -inf) can only come from a mask; softmax makes them NaN and they are zeroed."""
    m = s.amax(-1, keepdim=True)
    p = torch.softmax(s, -1)
    log_l = torch.log(p.amax(-1, keepdim=True)).neg_()
    dead = m == float("-inf")
    if may_have_dead_rows:
        p.masked_fill_(dead, 0.0)
        log_l.masked_fill_(dead, float("inf"))
    return p, m.masked_fill_(dead, 0.0), log_l


def _overlap(r0: int, r1: int, w0: int, w1: int):
    a, b = max(r0, w0), min(r1, w1)
    return (a, b) if a < b else None


def _kl_log_target(kl_target, attended, r0, r1, dtype, tnorm=None):
    """(log t, log mass): the fused KL's target (probabilities) over the keys the student attends
    (`attended` = s > -inf), renormalised there; pass the saved log mass `tnorm` (..., R, 1) in the
    backward."""
    norm = None if tnorm is None else (torch.zeros_like(tnorm), tnorm)
    log_t, _, log_z = log_target(rows_of(kl_target, r0, r1), attended, 1.0, False, dtype, norm)
    return log_t, log_z


def attention_forward(q, k, v, mask, scale: float, is_causal: bool, w_start: int, w_stop: int, kl_target=None):
    """Returns out (B, H, M, Dv) in q.dtype; stats (B, H, M, 2) float32 (float64 for float64 input):
    the row max m and log l, l = sum exp(S - m), (0, +inf) on rows with no attended key;
    weights (B, H, w_stop - w_start, N) in q.dtype, the exact softmax rows w_start:w_stop; and, with
    a kl_target of probabilities, kl (B, H, M) = KL(target || P) per row and tnorm (B, H, M) = log
    of the target mass over the attended keys (else None, None)."""
    B, H, M, _ = q.shape
    hkv, N = k.shape[1], k.shape[2]
    dt = compute_dtype(q.dtype)
    weights = q.new_empty(B, H, w_stop - w_start, N)
    kl = tnorm = None
    if kl_target is not None:
        kl, tnorm = (torch.empty(B, H, M, dtype=dt, device=q.device) for _ in range(2))
    k_, v_ = k.to(dt), v.to(dt).unsqueeze(2)
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    outs, stats = [], []
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        s = _scores(q[:, :, r0:r1], k_, mask, scale, is_causal, r0, r1, dt)
        p, m, log_l = _softmax_rows(s, mask is not None)
        if kl_target is not None:
            log_t, tn = _kl_log_target(kl_target, s > float("-inf"), r0, r1, dt)
            kl[:, :, r0:r1] = kl_rows(s, log_t)[0]
            tnorm[:, :, r0:r1] = tn.squeeze(-1)
        del s
        outs.append(torch.matmul(grouped(p, hkv), v_).flatten(1, 2).to(q.dtype))
        stats.append(torch.cat([m, log_l], -1))
        rows = _overlap(r0, r1, w_start, w_stop)
        if rows == (0, M) and p.dtype == q.dtype:
            weights = p  # one chunk holds every requested row: return it, no copy
        elif rows is not None:
            a, b = rows
            weights[:, :, a - w_start : b - w_start] = p[:, :, a - r0 : b - r0]
    # one chunk (the common case) needs no copy; several are concatenated (out and stats are small)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    stats = stats[0] if len(stats) == 1 else torch.cat(stats, 2)
    return out, stats, weights, kl, tnorm


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sums a (B, H, R, N) tensor over the dims where `shape` has size 1."""
    dims = [i for i, size in enumerate(shape) if size == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def attention_backward(grad_out, grad_weights, q, k, v, out, stats, mask, scale: float, is_causal: bool,
                       w_start: int, w_stop: int, mask_grad: bool, kl_target=None, tnorm=None, grad_kl=None):
    """Gradients (dq, dk, dv, dmask) given dL/dout (B, H, M, Dv), dL/dweights (B, H, R, N) or None,
    and dL/dkl (B, H, M) or None for the fused KL.

    dP = dO V^T + G, delta = rowsum(dO * O) + rowsum(P * G), dS = P (dP - delta) + g (P - t),
    dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO; dmask = dS summed to the mask's shape.
    """
    B, H, M, _ = q.shape
    hkv, N = k.shape[1], k.shape[2]
    dt = compute_dtype(q.dtype)
    k_dt = k.to(dt)
    k_, v_ = k_dt.unsqueeze(2), v.to(dt).unsqueeze(2)
    dq = q.new_empty(q.shape)  # contiguous, whatever q's strides (the fake kernel promises it)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    dv = torch.zeros(v.shape, dtype=dt, device=q.device)
    dmask = torch.zeros(mask.shape, dtype=dt, device=q.device) if mask_grad else None
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        q_rows = q[:, :, r0:r1].to(dt)
        s = _scores(q_rows, k_dt, mask, scale, is_causal, r0, r1, dt)
        attended = s > float("-inf") if grad_kl is not None else None
        m, log_l = stats[:, :, r0:r1].to(dt).split(1, -1)
        p = s.sub_(m).sub_(log_l).exp_()  # P = exp((S - m) - log l), in the scores' memory
        del s
        do = grad_out[:, :, r0:r1].to(dt)
        dv += torch.matmul(grouped(p, hkv).transpose(-1, -2), grouped(do, hkv)).sum(2)
        dp = torch.matmul(grouped(do, hkv), v_.transpose(-1, -2)).flatten(1, 2)
        delta = (do * out[:, :, r0:r1].to(dt)).sum(-1, keepdim=True)
        rows = _overlap(r0, r1, w_start, w_stop) if grad_weights is not None else None
        if rows is not None:
            a, b = rows
            g = grad_weights[:, :, a - w_start : b - w_start].to(dt)
            dp[:, :, a - r0 : b - r0] += g
            delta[:, :, a - r0 : b - r0] += (p[:, :, a - r0 : b - r0] * g).sum(-1, keepdim=True)
        ds = dp.sub_(delta).mul_(p)  # dS = P (dP - delta), in dP's memory
        if grad_kl is not None:
            tn = tnorm[:, :, r0:r1, None]
            log_t, _ = _kl_log_target(kl_target, attended, r0, r1, dt, tn)
            ds += kl_grad(grad_kl[:, :, r0:r1].to(dt), p, log_t, tn)  # P is not needed after this
        dq[:, :, r0:r1] = (torch.matmul(grouped(ds, hkv), k_).flatten(1, 2) * scale).to(q.dtype)
        dk += torch.matmul(grouped(ds, hkv).transpose(-1, -2), grouped(q_rows, hkv)).sum(2) * scale
        if dmask is not None:
            part = _sum_to(ds, mask.shape)
            if mask.shape[2] == 1:
                dmask += part
            else:
                dmask[:, :, r0:r1] += part
    return dq, dk.to(k.dtype), dv.to(v.dtype), (dmask.to(mask.dtype) if dmask is not None else None)


def attention_with_dropout(q, k, v, mask, scale: float, is_causal: bool, dropout_p: float,
                           w_start: int, w_stop: int, kl_target=None):
    """Differentiable eager attention with dropout on P (weights and KL use P before dropout).

    Holds the full (B, H, M, N) probabilities for autograd: dropout is not fused anywhere.
    Returns out, weights rows w_start:w_stop, and per-row KL(kl_target || P) or None.
    """
    hkv = k.shape[1]
    dt = compute_dtype(q.dtype)
    s = _scores(q, k.to(dt), mask, scale, is_causal, 0, q.shape[2], dt)
    m, log_l = row_stats(s)
    p = torch.exp((s - m) - log_l)  # not _softmax_rows: autograd must see this formula
    p_drop = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = torch.matmul(grouped(p_drop, hkv), v.to(dt).unsqueeze(2)).flatten(1, 2).to(q.dtype)
    kl = None
    if kl_target is not None:
        kl = kl_rows(s, _kl_log_target(kl_target, s > float("-inf"), 0, q.shape[2], dt)[0], differentiable=True)[0]
    return out, p[:, :, w_start:w_stop].to(q.dtype), kl
