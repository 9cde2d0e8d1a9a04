"""PyTorch reference for the KL loss with student logits s = (q k^T) * student_scale computed on
the fly, one row chunk at a time, so no (M, N) map of the student (or of an implicit teacher
u = (q_t k_t^T) * target_scale) is ever held whole. Same per-row math as attention_kl.
"""
from __future__ import annotations

import torch

from lfi.backends.torch._common import chunk_rows, compute_dtype, grouped, rows_of
from lfi.backends.torch.attention_kl import NEG_INF, _masked_fill, kl_grad, kl_rows, log_target, probs_of


def _logits(q_rows, k, scale: float):
    """(B, H, R, D) x (B, Hkv, N, D) -> (B, H, R, N) scaled logits (a fresh tensor), H % Hkv == 0.
    The scale is applied to q (R x D), not to the logits (R x N)."""
    return torch.matmul(grouped(q_rows * scale, k.shape[1]), k.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)


def _chunk_inputs(q, k, target, q_t, k_t, key_mask, r0, r1, student_scale, target_scale, dt):
    keep = rows_of(key_mask, r0, r1)
    s = _logits(q[:, :, r0:r1].to(dt), k, student_scale)
    if keep is not None:
        s = _masked_fill(s, ~keep, NEG_INF)
    target_rows = rows_of(target, r0, r1) if q_t is None else _logits(q_t[:, :, r0:r1].to(dt), k_t, 1.0)
    return s, keep, target_rows


def kl_qk_forward(q, k, target, q_t, k_t, key_mask, student_scale: float, target_scale: float,
                  target_is_logits: bool):
    """q (B, H, M, D), k (B, Hkv, N, D); a dense target broadcastable to (B, H, M, N), or an implicit
    teacher q_t (B, Ht in {1, H}, M, Dt), k_t (B, Htk, N, Dt) (always logits). Returns kl (B, H, M)
    and the row statistics stats, tstats (B, H, M, 2) of attention_kl's reference, float32 (float64
    for float64 inputs)."""
    B, H, M, _ = q.shape
    N = k.shape[2]
    dt = compute_dtype(q.dtype)
    k, k_t = k.to(dt), (k_t.to(dt) if k_t is not None else None)
    kl = torch.empty(B, H, M, dtype=dt, device=q.device)
    stats, tstats = (torch.empty(B, H, M, 2, dtype=dt, device=q.device) for _ in range(2))
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        s, keep, target_rows = _chunk_inputs(q, k, target, q_t, k_t, key_mask, r0, r1, student_scale, target_scale, dt)
        log_t, shift, log_z = log_target(target_rows, keep, target_scale, target_is_logits or q_t is not None, dt)
        kl[:, :, r0:r1], m, log_l = kl_rows(s, log_t.expand(s.shape))
        stats[:, :, r0:r1] = torch.cat([m, log_l], -1)
        tstats[:, :, r0:r1] = torch.cat([shift, log_z], -1).expand(B, H, r1 - r0, 2)
    return kl, stats, tstats


def kl_qk_backward(grad_kl, q, k, target, q_t, k_t, key_mask, stats, tstats, student_scale: float,
                   target_scale: float, target_is_logits: bool):
    """Returns (dq, dk): dS = grad_kl * (softmax(s) - t), dq = student_scale dS k,
    dk = student_scale dS^T q summed over the query heads of each kv head."""
    B, H, M, _ = q.shape
    hkv, N = k.shape[1], k.shape[2]
    dt = compute_dtype(q.dtype)
    k_dt, k_t = k.to(dt), (k_t.to(dt) if k_t is not None else None)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        s, keep, target_rows = _chunk_inputs(q, k_dt, target, q_t, k_t, key_mask, r0, r1, student_scale,
                                             target_scale, dt)
        norm = tstats[:, :, r0:r1, :1], tstats[:, :, r0:r1, 1:]
        log_t, _, log_z = log_target(target_rows, keep, target_scale, target_is_logits or q_t is not None, dt, norm)
        ds = kl_grad(grad_kl[:, :, r0:r1].to(dt), probs_of(s, stats[:, :, r0:r1]), log_t, log_z)
        if keep is not None:  # dropped keys get 0, also on NaN rows (as the other backends)
            ds = _masked_fill(ds, ~keep, 0.0)
        # student_scale goes on the (R x D) and (N x D) products, not on dS (R x N)
        dq[:, :, r0:r1] = (torch.matmul(grouped(ds, hkv), k_dt.unsqueeze(2)).flatten(1, 2) * student_scale).to(q.dtype)
        dk += torch.matmul(grouped(ds, hkv).transpose(-1, -2), grouped(q[:, :, r0:r1].to(dt), hkv)).sum(2)
    return dq, (dk * student_scale).to(k.dtype)
