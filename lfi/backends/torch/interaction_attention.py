"""PyTorch reference backend: exact attention with maps, in row chunks so memory stays bounded.

Works on any device. Computes in float32 (float64 for float64 inputs). Without maps, the largest
temporary is one chunk of scores of about LFI_TORCH_CHUNK_BYTES (default 64 MiB), never the full
(B, H, M, N) matrix. Shapes: q (B, H, M, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), mask and
kl_target 4-D and broadcastable to (B, H, M, N).
"""
from __future__ import annotations

import torch

from lfi.backends.torch._common import chunk_rows, compute_dtype, grouped, row_stats, rows_of
from lfi.backends.torch.attention_kl import kl_grad, kl_rows, log_target


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype` (itself when it already is: no dispatch for the common fp32/fp64 case)."""
    return t if t.dtype == dtype else t.to(dtype)


def _rows(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 (dim 2) of `t`: `t` itself when that is all of them (one chunk, the common case)."""
    return t if r0 == 0 and r1 == t.shape[2] else t[:, :, r0:r1]


def _mm(a: torch.Tensor, b: torch.Tensor, hkv: int) -> torch.Tensor:
    """a (B, H, R, X) @ b (B, Hkv, X, Y) -> (B, H, R, Y): q head h uses kv head h // (H // Hkv)."""
    if a.shape[1] == hkv:
        return torch.matmul(a, b)
    return torch.matmul(grouped(a, hkv), b.unsqueeze(2)).flatten(1, 2)


def _mm_kv(a: torch.Tensor, b: torch.Tensor, hkv: int) -> torch.Tensor:
    """a (B, H, X, R) @ b (B, H, R, Y) summed over the q heads of each kv head: (B, Hkv, X, Y)."""
    if a.shape[1] == hkv:
        return torch.matmul(a, b)
    return torch.matmul(grouped(a, hkv), grouped(b, hkv)).sum(2)


def _scores(q_rows, k, mask, scale, is_causal, r0, r1, dtype):
    """Masked scores for query rows r0:r1: (B, H, r1-r0, N) in `dtype`, a fresh tensor that callers
    may overwrite (the mask and the scale are applied in place: no extra full-size temporaries).
    `k` is (B, Hkv, N, D) in `dtype`."""
    hkv, N = k.shape[1], k.shape[2]
    # scale q (R x D) rather than the scores (R x N): fewer multiplies, same result to an ulp
    s = _mm(_as(q_rows, dtype) * scale, k.transpose(-1, -2), hkv)
    m = rows_of(mask, r0, r1)
    if m is not None:
        if m.dtype == torch.bool:
            s.masked_fill_(~m, float("-inf"))
        else:
            s.add_(_as(m, dtype))
    if is_causal:  # key j > query r0 + i is masked: the upper triangle from diagonal r0 + 1
        s.masked_fill_(torch.ones(r1 - r0, N, dtype=torch.bool, device=s.device).triu_(r0 + 1), float("-inf"))
    return s


def _probs_only(s, may_have_dead_rows: bool):
    """(p, dead): softmax(s) over the last dim, exactly 0 on rows without an attended key
    (_softmax_rows' p, bit for bit, without the row statistics), and those rows (..., 1) bool (None
    when there can be none)."""
    p = torch.softmax(s, -1)
    dead = None
    if may_have_dead_rows:
        dead = s.amax(-1, keepdim=True) == float("-inf")  # False on NaN rows: they propagate
        p.masked_fill_(dead, 0.0)
    return p, dead


def _softmax_rows(s, may_have_dead_rows: bool):
    """(p, m, log_l, dead): p = softmax(s) over the last dim, exactly 0 on rows without an attended key;
    the row max m (0 there) and log l, l = sum exp(s - m) (+inf there), each (..., 1).

    torch.softmax is one vectorised pass; l is read back from the row max's own probability,
    exp(0) / l, instead of a second exp pass (accurate to an ulp of log l). Rows without an attended
    key (all -inf) can only come from a mask; softmax makes them NaN and they are zeroed. dead:
    those rows, (..., 1) bool, or None when there can be none. A NaN / +inf score makes its row of
    p and log l NaN (as eager softmax; README "Numerics")."""
    m = s.amax(-1, keepdim=True)
    p = torch.softmax(s, -1)
    log_l = torch.log(p.amax(-1, keepdim=True)).neg_()
    if may_have_dead_rows:
        dead = m == float("-inf")
        p.masked_fill_(dead, 0.0)
        log_l.masked_fill_(dead, float("inf"))
        return p, m.masked_fill_(dead, 0.0), log_l, dead
    # No mask: a row is all -inf only through -inf in the inputs; its m is 0 too (one op, not two)
    return p, m.nan_to_num_(float("nan"), float("inf"), 0.0), log_l, None


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


# attention_forward(..., need_stats=False) skips the row statistics when no backward will run.
STATS_OPTIONAL = True


def attention_forward(q, k, v, mask, scale: float, is_causal: bool, w_start: int, w_stop: int, kl_target=None,
                      need_stats: bool = True):
    """Returns out (B, H, M, Dv) in q.dtype; stats (B, H, M, 2) float32 (float64 for float64 input):
    the row max m and log l, l = sum exp(S - m), (0, +inf) on rows with no attended key;
    weights (B, H, w_stop - w_start, N) in q.dtype, the exact softmax rows w_start:w_stop; and, with
    a kl_target of probabilities, kl (B, H, M) = KL(target || P) per row and tnorm (B, H, M) = log
    of the target mass over the attended keys (else None, None).

    need_stats=False (nothing will run the backward): stats is None and its two passes over the
    scores (row max, max probability) are skipped; out, weights and kl are unchanged."""
    B, H, M, _ = q.shape
    hkv, N = k.shape[1], k.shape[2]
    dt = compute_dtype(q.dtype)
    kl = tnorm = None
    if kl_target is not None:
        kl, tnorm = (torch.empty(B, H, M, dtype=dt, device=q.device) for _ in range(2))
    k_, v_ = _as(k, dt), _as(v, dt)
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    weights = None
    outs, stats = [], []
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        s = _scores(_rows(q, r0, r1), k_, mask, scale, is_causal, r0, r1, dt)
        if need_stats:
            p, m, log_l, dead = _softmax_rows(s, mask is not None)
            stats.append(torch.cat([m, log_l], -1))
        else:
            p, dead = _probs_only(s, mask is not None)
        if kl_target is not None:
            log_t, tn = _kl_log_target(kl_target, s > float("-inf"), r0, r1, dt)
            kl[:, :, r0:r1] = kl_rows(s, log_t)[0]
            tnorm[:, :, r0:r1] = tn.squeeze(-1)
        del s
        o = _mm(p, v_, hkv)
        if dead is not None:  # exactly 0 on rows without an attended key, even with NaN in V (0 * NaN)
            o.masked_fill_(dead, 0.0)
        outs.append(_as(o, q.dtype))
        rows = _overlap(r0, r1, w_start, w_stop)
        if rows == (0, M) and p.dtype == q.dtype:
            weights = p  # one chunk holds every requested row: return it, no copy
        elif rows is not None:
            if weights is None:
                weights = q.new_empty(B, H, w_stop - w_start, N)
            a, b = rows
            weights[:, :, a - w_start : b - w_start] = p[:, :, a - r0 : b - r0]
    if weights is None:  # no rows requested: (B, H, 0, N)
        weights = q.new_empty(B, H, w_stop - w_start, N)
    # one chunk (the common case) needs no copy; several are concatenated (out and stats are small)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    stats = None if not stats else stats[0] if len(stats) == 1 else torch.cat(stats, 2)
    return out, stats, weights, kl, tnorm


def probs_to_keep(q, weights, w_start: int, w_stop: int):
    """The returned maps when they are this backend's P itself (every row, in the compute dtype):
    the backward then reads them instead of recomputing the scores and the softmax (eager attention
    keeps P for its backward too). None otherwise."""
    if (w_start, w_stop) == (0, q.shape[2]) and weights.dtype == compute_dtype(q.dtype):
        return weights
    return None


def keeps_maps_for_backward(q, k, v, mask, kl_target) -> bool:
    """Whether a call without maps that will run the backward should still ask for every row's maps,
    so that the backward reads P (see probs_to_keep) instead of recomputing the scores and the
    softmax: when one row chunk holds the whole problem (P is then within the memory budget of one
    chunk, LFI_TORCH_CHUNK_BYTES), the inputs are in the compute dtype (float32 / float64), there is no
    fused KL and some input requires grad. Eager attention keeps P too."""
    needs_grad = any(t is not None and t.requires_grad for t in (q, k, v, mask))
    B, H, M, _ = q.shape
    dt = compute_dtype(q.dtype)
    return (needs_grad and kl_target is None and q.dtype == dt  # maps in q's dtype are P only in dt
            and chunk_rows(B, H, M, k.shape[2], torch.finfo(dt).bits // 8) >= M)


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sums a (B, H, R, N) tensor over the dims where `shape` has size 1."""
    dims = [i for i, size in enumerate(shape) if size == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def attention_backward(grad_out, grad_weights, q, k, v, out, stats, mask, scale: float, is_causal: bool,
                       w_start: int, w_stop: int, mask_grad: bool, kl_target=None, tnorm=None, grad_kl=None,
                       probs=None):
    """Gradients (dq, dk, dv, dmask) given dL/dout (B, H, M, Dv) or None (then dV = 0, dP = G),
    dL/dweights (B, H, R, N) or None, and dL/dkl (B, H, M) or None for the fused KL. probs: P of
    every row (see probs_to_keep), read instead of recomputed (never written).

    dP = dO V^T + G, delta = rowsum(P * dP) (= rowsum(dO * O) + rowsum(P * G)), dS = P (dP - delta) + g (P - t),
    dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO; dmask = dS summed to the mask's shape.
    One chunk (the common case) writes dq, dk and dv straight from its products; several chunks
    accumulate dk and dv into the first chunk's products and copy their dq rows into one tensor.
    """
    B, H, M, _ = q.shape
    hkv, N = k.shape[1], k.shape[2]
    dt = compute_dtype(q.dtype)
    k_dt, v_dt = _as(k, dt), _as(v, dt)
    step = chunk_rows(B, H, M, N, torch.finfo(dt).bits // 8)
    # contiguous, whatever q's strides (the fake kernel promises it)
    dq = q.new_empty(q.shape) if step < M else None
    dk = dv = None
    dmask = torch.zeros(mask.shape, dtype=dt, device=q.device) if mask_grad else None
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        q_rows = _as(_rows(q, r0, r1), dt)
        if probs is not None and grad_kl is None:
            p = _rows(probs, r0, r1)
        else:
            s = _scores(q_rows, k_dt, mask, scale, is_causal, r0, r1, dt)
            attended = s > float("-inf") if grad_kl is not None else None
            # P recomputed as the forward computed it: the same scores through the same softmax
            # kernel give the same P bit for bit (and one fused pass is faster than exp((S - m) - log l)).
            p = torch.softmax(s, -1)
            del s
            if mask is not None:  # rows without an attended key (log l = +inf): zeros, as in the forward
                p.masked_fill_(_rows(stats, r0, r1)[..., 1:] == float("inf"), 0.0)
        if grad_out is not None:
            do = _as(_rows(grad_out, r0, r1), dt)
            part = _mm_kv(p.transpose(-1, -2), do, hkv)
            dv = part if dv is None else dv.add_(part)
            dp = _mm(do, v_dt.transpose(-1, -2), hkv)
        else:
            dp = torch.zeros_like(p)
        rows = _overlap(r0, r1, w_start, w_stop) if grad_weights is not None else None
        if rows is not None:
            a, b = rows
            _rows(dp, a - r0, b - r0).add_(_as(_rows(grad_weights, a - w_start, b - w_start), dt))
        # dS = P (dP - delta), delta = rowsum(P dP) = rowsum(dO * O) + rowsum(P * G): every key of
        # a row is in this chunk, so the softmax backward kernel does it in one pass over dP and P
        ds = torch._softmax_backward_data(dp, p, -1, dt)
        del dp
        if grad_kl is not None:
            tn = tnorm[:, :, r0:r1, None]
            log_t, _ = _kl_log_target(kl_target, attended, r0, r1, dt, tn)
            ds += kl_grad(grad_kl[:, :, r0:r1].to(dt), p, log_t, tn)  # P is not needed after this
        dq_rows = _mm(ds, k_dt, hkv).mul_(scale)
        if dq is None:
            dq = _as(dq_rows, q.dtype)
        else:
            dq[:, :, r0:r1] = dq_rows
        part = _mm_kv(ds.transpose(-1, -2), q_rows, hkv).mul_(scale)
        dk = part if dk is None else dk.add_(part)
        if dmask is not None:
            part = _sum_to(ds, mask.shape)
            if mask.shape[2] == 1:
                dmask += part
            else:
                dmask[:, :, r0:r1] += part
    dv = _as(dv, v.dtype) if dv is not None else torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    return dq, _as(dk, k.dtype), dv, (_as(dmask, mask.dtype) if dmask is not None else None)


def attention_with_dropout(q, k, v, mask, scale: float, is_causal: bool, dropout_p: float,
                           w_start: int, w_stop: int, kl_target=None):
    """Differentiable eager attention with dropout on P (weights and KL use P before dropout).

    Holds the full (B, H, M, N) probabilities for autograd: dropout is not fused anywhere.
    Returns out, weights rows w_start:w_stop, and per-row KL(kl_target || P) or None. With the
    weights of every row, out is computed from the returned weights (rounded to q's dtype first).
    """
    hkv = k.shape[1]
    dt = compute_dtype(q.dtype)
    s = _scores(q, k.to(dt), mask, scale, is_causal, 0, q.shape[2], dt)
    m, log_l = row_stats(s)
    if mask is None:  # only a mask empties a row: an all -inf row comes from infinite q / k and is NaN
        log_l = torch.where(log_l == float("inf"), float("-inf"), log_l)
    p = torch.exp((s - m) - log_l)  # not _softmax_rows: autograd must see this formula
    # Maps of every row: the returned tensor itself (in q's dtype, as eager rounds it) feeds
    # dropout(W) @ V, so that out depends on it as in eager (w.retain_grad(), hooks on w).
    every_row = (w_start, w_stop) == (0, q.shape[2])
    w = (p if every_row else p[:, :, w_start:w_stop]).to(q.dtype)
    p_drop = torch.nn.functional.dropout(w.to(dt) if every_row else p, dropout_p, training=True)
    o = _mm(p_drop, _as(v, dt), hkv)
    if mask is not None:  # 0 on rows without an attended key, even with NaN in V (log l = +inf there)
        o = torch.where(log_l == float("inf"), 0.0, o)
    out = _as(o, q.dtype)
    kl = None
    if kl_target is not None:
        kl = kl_rows(s, _kl_log_target(kl_target, s > float("-inf"), 0, q.shape[2], dt)[0], differentiable=True)[0]
    return out, w, kl
