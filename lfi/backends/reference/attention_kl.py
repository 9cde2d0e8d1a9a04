"""PyTorch reference for the attention-matching KL loss on dense student logits.

Per row (b, h, m) over the N keys kept by key_mask: s = logits * student_scale,
t = target / sum(target) (probabilities) or softmax(target * target_scale) (logits), and
KL = sum_j t_j (log t_j - log softmax(s)_j), with 0 log 0 = 0. Rows with no kept key, or whose
target mass is zero, give 0. Row statistics returned for the backward:
lse = logsumexp(s) (+inf with no kept key) and tnorm = log(sum target) or logsumexp(u).
Computed in float32 (float64 for float64 inputs), in row chunks.
"""
from __future__ import annotations

import torch

from lfi.backends.reference._common import chunk_rows, compute_dtype, row_stats, rows_of

NEG_INF = float("-inf")




def log_target(target, keep, target_scale: float, target_is_logits: bool, dtype, tnorm=None):
    """(log t, tnorm): the target's log-distribution over kept keys (-inf elsewhere, and on rows
    without target mass) and its normaliser: logsumexp of the scaled logits (+inf with no kept key)
    or log of the probability mass (-inf when it is zero). Pass the saved tnorm (..., R, 1) to
    recompute log t in the backward."""
    if target_is_logits:
        logits = target.to(dtype) * target_scale
        if keep is not None:
            logits = logits.masked_fill(~keep, NEG_INF)
        if tnorm is None:
            # Centred on the row max, so that teacher logits ~1e4 keep their precision.
            m, log_l = row_stats(logits)
            return (logits - m) - log_l, m + log_l
        return logits - tnorm.to(dtype), tnorm
    probs = target.to(dtype)
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0)
    if tnorm is None:
        tnorm = torch.log(probs.sum(-1, keepdim=True))
    tnorm = tnorm.to(dtype)
    log_t = torch.where(tnorm > NEG_INF, torch.log(probs) - tnorm, NEG_INF)
    return log_t, tnorm


def kl_rows(s, log_t):
    """Per-row KL(t || softmax(s)) for masked scores s (-inf at dropped keys) and log t; plus lse(s).

    Terms are taken against the centred scores s - max, so that huge logits (|s| ~ 1e4, or a whole
    row at finfo.min) do not cancel catastrophically.
    """
    m, log_l = row_stats(s)
    t = torch.exp(log_t)
    # t = 0 terms contribute 0 (also where s = -inf); rows without kept keys have t = 0 everywhere.
    terms = torch.where(t > 0, t * (log_t - (s - m) + log_l), torch.zeros_like(t))
    return terms.sum(-1), m + log_l


def kl_grad(grad_kl, p, log_t, tnorm):
    """dKL/ds = grad_kl * (p - t) for the student's probabilities p = softmax(s); zero at dropped keys,
    on rows without kept keys and on rows without target mass (tnorm = -inf), whose KL is 0."""
    grad_kl = torch.where(tnorm.squeeze(-1) > NEG_INF, grad_kl, 0.0)
    return grad_kl[..., None] * (p - torch.exp(log_t))


def _scores(logits, keep, student_scale, dtype):
    s = logits.to(dtype) * student_scale
    return s.masked_fill(~keep, NEG_INF) if keep is not None else s


def kl_forward(logits, target, key_mask, student_scale: float, target_scale: float, target_is_logits: bool):
    """logits (B, H, M, N); target and key_mask 4-D, broadcastable to it.
    Returns kl, lse, tnorm: (B, H, M) each, float32 (float64 for float64 logits)."""
    B, H, M, N = logits.shape
    dt = compute_dtype(logits.dtype)
    kl, lse, tnorm = (torch.empty(B, H, M, dtype=dt, device=logits.device) for _ in range(3))
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        keep = rows_of(key_mask, r0, r1)
        log_t, tn = log_target(rows_of(target, r0, r1), keep, target_scale, target_is_logits, dt)
        s = _scores(logits[:, :, r0:r1], keep, student_scale, dt)
        log_t = log_t.expand(s.shape)
        kl[:, :, r0:r1], lse_rows = kl_rows(s, log_t)
        lse[:, :, r0:r1] = lse_rows.squeeze(-1)
        tnorm[:, :, r0:r1] = tn.squeeze(-1).expand(B, H, r1 - r0)
    return kl, lse, tnorm


def kl_backward(grad_kl, logits, target, key_mask, lse, tnorm, student_scale: float, target_scale: float,
                target_is_logits: bool):
    """Returns dlogits (B, H, M, N) in logits.dtype: grad_kl * (softmax(s) - t) * student_scale."""
    B, H, M, N = logits.shape
    dt = compute_dtype(logits.dtype)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        keep = rows_of(key_mask, r0, r1)
        tn = tnorm[:, :, r0:r1, None]
        log_t, _ = log_target(rows_of(target, r0, r1), keep, target_scale, target_is_logits, dt, tn)
        s = _scores(logits[:, :, r0:r1], keep, student_scale, dt)
        ds = kl_grad(grad_kl[:, :, r0:r1].to(dt), torch.exp(s - lse[:, :, r0:r1, None].to(dt)), log_t, tn)
        dlogits[:, :, r0:r1] = (ds * student_scale).to(logits.dtype)
    return dlogits
