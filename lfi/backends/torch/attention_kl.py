"""PyTorch reference for the attention-matching KL loss on dense student logits.

Per row (b, h, m) over the N keys kept by key_mask: s = logits * student_scale,
t = target / sum(target) (probabilities) or softmax(target * target_scale) (logits), and
KL = sum_j t_j (log t_j - log softmax(s)_j), with 0 log 0 = 0. Rows with no kept key, or whose
target mass is zero, give 0. Row statistics returned for the backward, each a pair (why:
lfi._numerics): stats = (row max m, log l) of s and tstats = (shift, log_z) of the target (see
log_target).
Computed in float32 (float64 for float64 inputs), in row chunks.
"""
from __future__ import annotations

import torch

from lfi.backends.torch._common import chunk_rows, compute_dtype, row_stats, rows_of

NEG_INF = float("-inf")


def _owns(x: torch.Tensor, *others) -> bool:
    """Whether an in-place op of x with `others` keeps x's shape (else it must broadcast out of place)."""
    return torch.broadcast_shapes(x.shape, *(o.shape for o in others)) == x.shape


def _masked_fill(x, mask, value):
    """x (a fresh tensor) filled where mask, in place when the mask does not broadcast x larger."""
    return x.masked_fill_(mask, value) if _owns(x, mask) else x.masked_fill(mask, value)


def _normalize_log(x, shift, log_z):
    """(x - shift) - log_z for a fresh x, in place where shapes allow (subtracted in two steps: one
    folded logsumexp loses the 1/l of rows at finfo.min)."""
    return x.sub_(shift).sub_(log_z) if _owns(x, shift, log_z) else (x - shift) - log_z


def log_target(target, keep, target_scale: float, target_is_logits: bool, dtype, norm=None):
    """(log t, shift, log_z): the target's log-distribution over kept keys (-inf elsewhere, and on
    rows without target mass) and its normaliser kept as two (..., R, 1) parts, log t = (u - shift) -
    log_z. Logits u = target * target_scale: shift = row max of u (0 with no kept key), log_z = log
    sum exp(u - shift) (+inf with no kept key). Probabilities: shift = 0, log_z = log of the mass
    (-inf when it is zero). Kept apart so that rows of logits ~1e4 or at finfo.min lose nothing.
    Pass the saved (shift, log_z) as `norm` to recompute log t in the backward. Never modifies target."""
    if target_is_logits:
        u = target.to(dtype) * target_scale  # a fresh tensor from here on
        if keep is not None:
            u = _masked_fill(u, ~keep, NEG_INF)
        shift, log_z = row_stats(u) if norm is None else (n.to(dtype) for n in norm)
        return _normalize_log(u, shift, log_z), shift, log_z
    probs = target.to(dtype)
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0)
    if norm is None:
        log_z = torch.log(probs.sum(-1, keepdim=True))
        # Z = +inf (a +inf weight): t = target / Z is NaN there; a NaN log Z makes the whole row's KL and
        # gradient NaN (as F.kl_div on the normalised target), on every backend.
        log_z = log_z.masked_fill_(log_z == float("inf"), float("nan"))
        shift = torch.zeros_like(log_z)
    else:
        shift, log_z = (n.to(dtype) for n in norm)
    log_t = torch.log(probs)
    log_t = log_t.sub_(log_z) if _owns(log_t, log_z) else log_t - log_z
    return _masked_fill(log_t, log_z == NEG_INF, NEG_INF), shift, log_z


def kl_rows(s, log_t, differentiable: bool = False):
    """Per-row KL(t || softmax(s)) for masked scores s (-inf at dropped keys) and log t (both left
    unchanged); plus the student's row statistics (m, log l), each (..., 1).

    Terms are taken against the centred scores s - max, so that huge logits (|s| ~ 1e4, or a whole
    row at finfo.min) do not cancel catastrophically. Two full-size temporaries, updated in place;
    differentiable=True computes out of place, for callers that backpropagate through autograd.
    """
    m, log_l = row_stats(s)
    t = torch.exp(log_t)
    if differentiable:
        terms = t * (log_t - (s - m) + log_l)
    else:
        terms = (s - m).sub_(log_l).neg_().add_(log_t).mul_(t)  # t (log t - log p), in one temporary
    # t = 0 terms contribute 0 (also where s = -inf); rows without kept keys have t = 0 everywhere.
    # `t == 0`, not `t <= 0`: a NaN t (NaN / +inf in the target) keeps its NaN term, as F.kl_div.
    return torch.where(t == 0, 0.0, terms).sum(-1), m, log_l


def probs_of(s, stats):
    """softmax(s) from saved (..., R, 2) row statistics (m, log l), computed in s's memory."""
    return _normalize_log(s, stats[..., :1].to(s.dtype), stats[..., 1:].to(s.dtype)).exp_()


def kl_grad(grad_kl, p, log_t, log_z):
    """dKL/ds = grad_kl * (p - t) for the student's probabilities p = softmax(s) (overwritten); zero
    at rows without kept keys and on rows without target mass (log_z = -inf); NaN on rows whose
    statistics are NaN. Callers zero the dropped keys (which a NaN row would otherwise fill with NaN)."""
    grad_kl = torch.where(log_z.squeeze(-1) != NEG_INF, grad_kl, 0.0)
    return p.sub_(torch.exp(log_t)).mul_(grad_kl[..., None])


def _scores(logits, keep, student_scale, dtype):
    """Fresh scaled student scores, -inf at dropped keys."""
    s = logits.to(dtype) * student_scale
    return _masked_fill(s, ~keep, NEG_INF) if keep is not None else s


def kl_forward(logits, target, key_mask, student_scale: float, target_scale: float, target_is_logits: bool):
    """logits (B, H, M, N); target and key_mask 4-D, broadcastable to it. Returns kl (B, H, M), and
    stats, tstats (B, H, M, 2): the student's (row max, log l) and the target's (shift, log_z)
    (see log_target); float32 (float64 for float64 logits)."""
    B, H, M, N = logits.shape
    dt = compute_dtype(logits.dtype)
    kl = torch.empty(B, H, M, dtype=dt, device=logits.device)
    stats, tstats = (torch.empty(B, H, M, 2, dtype=dt, device=logits.device) for _ in range(2))
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        keep = rows_of(key_mask, r0, r1)
        log_t, shift, log_z = log_target(rows_of(target, r0, r1), keep, target_scale, target_is_logits, dt)
        s = _scores(logits[:, :, r0:r1], keep, student_scale, dt)
        kl[:, :, r0:r1], m, log_l = kl_rows(s, log_t.expand(s.shape))
        stats[:, :, r0:r1] = torch.cat([m, log_l], -1)
        tstats[:, :, r0:r1] = torch.cat([shift, log_z], -1).expand(B, H, r1 - r0, 2)
    return kl, stats, tstats


def kl_backward(grad_kl, logits, target, key_mask, stats, tstats, student_scale: float, target_scale: float,
                target_is_logits: bool):
    """Returns dlogits (B, H, M, N) in logits.dtype: grad_kl * (softmax(s) - t) * student_scale."""
    B, H, M, N = logits.shape
    dt = compute_dtype(logits.dtype)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        keep = rows_of(key_mask, r0, r1)
        norm = tstats[:, :, r0:r1, :1], tstats[:, :, r0:r1, 1:]
        log_t, _, log_z = log_target(rows_of(target, r0, r1), keep, target_scale, target_is_logits, dt, norm)
        s = _scores(logits[:, :, r0:r1], keep, student_scale, dt)
        ds = kl_grad(grad_kl[:, :, r0:r1].to(dt), probs_of(s, stats[:, :, r0:r1]), log_t, log_z)
        if keep is not None:  # dropped keys get 0, also on NaN rows (as the other backends)
            ds = _masked_fill(ds, ~keep, 0.0)
        dlogits[:, :, r0:r1] = (ds * student_scale).to(logits.dtype)
    return dlogits
