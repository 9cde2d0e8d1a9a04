"""The float64 references of the test suite (the ground truth every backend is compared against).

Everything is computed in float64 with ordinary differentiable torch ops, so gradients of the
references (via torch.autograd) are the expected gradients. This is the only place in tests/ that
computes attention scores, masked scores, softmax maps or KL rows for comparison:

* attention: ``scores`` (scale * q k^T with grouped-query heads), ``masked_scores`` (plus a bool /
  float mask and causal masking, -inf where a row does not attend a key), ``reference_attention``
  (out and P), ``reference_lse`` and ``select_weights``;
* attention KL: ``ref_kl_rows`` (F.log_softmax + F.kl_div with the key mask and the renormalisation
  of both distributions over the kept keys done by hand) and its independent closed-form twin
  ``ref_kl_rows_direct``, ``ref_reduce``; ``ref_kl_qk_rows`` on materialized q k^T logits (dense or
  implicit q_t k_t^T teachers); ``ref_fused_kl_rows`` on the masked scores of the attention pass;
* the numerics contract (README "Numerics"): ``eager_attention``, ``eager_kl_rows`` and
  ``eager_target_probs``, in which NaN and inf propagate as in eager PyTorch.

Query rows with no attended key give zeros in the output, the probabilities and the KL, and zero
gradients (in the eager references too, as the contract says).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF, INF, NAN = float("-inf"), float("inf"), float("nan")


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

def scores(q, k, scale=None):
    """scale * q k^T in float64, (B, H, M, N); query head h reads kv head h // (H // Hkv). The scale
    defaults to D ** -0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k64 = k.to(torch.float64).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return scale * torch.matmul(q.to(torch.float64), k64.transpose(-1, -2))


def masked_scores(q, k, attn_mask=None, is_causal=False, scale=None):
    """``scores`` (+ a float mask) in float64, -inf where the row does not attend the key.

    attn_mask: None, bool (True = attend) or float (added to the scores), broadcastable to
    (B, H, M, N). is_causal: query i attends keys j <= i (top-left aligned), combined with the mask."""
    B, H, M, _ = q.shape
    N = k.shape[2]
    s = scores(q, k, scale)
    allowed = torch.ones(B, H, M, N, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(torch.float64)
    if is_causal:
        allowed = allowed & torch.ones(M, N, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~allowed, NEG_INF)


def reference_attention(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Returns (out, P) in float64.

    q (B, H, M, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) with H % Hkv == 0 (query head h uses kv
    head h // (H // Hkv)), or 3-D (B, L, D) tensors (single head; results are then 3-D too).
    attn_mask, is_causal: as in ``masked_scores``. out: (B, H, M, Dv); P: (B, H, M, N).
    """
    three_d = q.dim() == 3
    if three_d:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    H, Hkv = q.shape[1], k.shape[1]
    assert H % Hkv == 0
    s = masked_scores(q, k, attn_mask, is_causal, scale)  # (B, H, M, N)
    v64 = v.to(torch.float64).repeat_interleave(H // Hkv, dim=1)
    row_ok = (s > NEG_INF).any(-1, keepdim=True)  # rows with at least one attended key
    s = torch.where(row_ok, s, torch.zeros_like(s))
    p = torch.softmax(s, dim=-1)
    p = torch.where(row_ok, p, torch.zeros_like(p))
    out = torch.matmul(p, v64)
    if three_d:
        out, p = out.squeeze(1), p.squeeze(1)
    return out, p


def reference_lse(q, k, attn_mask=None, is_causal=False, scale=None):
    """Row logsumexp of the masked scores, float64 (B, H, M); +inf for fully masked rows."""
    lse = torch.logsumexp(masked_scores(q, k, attn_mask, is_causal, scale), dim=-1)
    return torch.where(lse == NEG_INF, torch.full_like(lse, float("inf")), lse)


def select_weights(p, weights_rows=None, average_attn_weights=False):
    """Applies the API's weights_rows / average_attn_weights to a full (B, H, M, N) map (or a 3-D
    (B, M, N) single-head map, for which averaging over heads changes nothing)."""
    if weights_rows is not None:
        start, stop = weights_rows
        p = p[..., start:stop, :]
    if average_attn_weights and p.dim() == 4:
        p = p.mean(1)
    return p


# --------------------------------------------------------------------------------------------------
# Attention KL: KL(target || softmax(logits / T)) per row
# --------------------------------------------------------------------------------------------------

def _keep(key_mask, shape, device):
    if key_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    km = key_mask.to(device)
    return km.reshape((1,) * (len(shape) - km.dim()) + tuple(km.shape)).expand(shape)


def ref_target_probs(target, shape, target_is="probs", temperature=1.0, key_mask=None):
    """The target distribution (float64, detached) over the kept keys, renormalised there; all zeros
    on rows with no kept key or no target mass."""
    keep = _keep(key_mask, shape, target.device)
    t = target.detach().to(torch.float64)
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape)).expand(shape)
    if target_is == "probs":
        t = torch.where(keep, t, torch.zeros_like(t))
        mass = t.sum(-1, keepdim=True)
        return torch.where(mass > 0, t / torch.where(mass > 0, mass, torch.ones_like(mass)), torch.zeros_like(t))
    u = t / temperature if target_is == "logits" else t
    row_ok = keep.any(-1, keepdim=True)
    u = torch.where(row_ok, u.masked_fill(~keep, NEG_INF), torch.zeros_like(u))
    p = torch.softmax(u, -1)
    return torch.where(keep & row_ok, p, torch.zeros_like(p))


def ref_student_log_probs(s, key_mask=None):
    """log softmax(s) over the kept keys (float64, differentiable); 0 at dropped keys and on rows with
    no kept key, so that every later product stays finite."""
    keep = _keep(key_mask, s.shape, s.device)
    row_ok = keep.any(-1, keepdim=True)
    s_m = torch.where(row_ok, s.masked_fill(~keep, NEG_INF), torch.zeros_like(s))
    logp = F.log_softmax(s_m, dim=-1)
    return torch.where(keep & row_ok, logp, torch.zeros_like(logp))


def ref_kl_rows(logits, target, target_is="probs", temperature=1.0, key_mask=None):
    """Per-row KL(t || softmax(logits / T)) via F.kl_div, float64, differentiable w.r.t. logits."""
    s = logits.to(torch.float64) / temperature
    t = ref_target_probs(target, s.shape, target_is, temperature, key_mask)
    logp = ref_student_log_probs(s, key_mask)
    return F.kl_div(logp, t, reduction="none").sum(-1)


def ref_kl_rows_direct(logits, target, target_is="probs", temperature=1.0, key_mask=None):
    """Per-row KL by the closed form sum t log t - sum t s + lse(s) over the kept keys (float64)."""
    s = logits.detach().to(torch.float64) / temperature
    keep = _keep(key_mask, s.shape, s.device)
    t = ref_target_probs(target, s.shape, target_is, temperature, key_mask)
    s_m = s.masked_fill(~keep, NEG_INF)
    lse = torch.logsumexp(s_m, -1)
    has_mass = t.sum(-1) > 0
    lse = torch.where(has_mass, lse, torch.zeros_like(lse))
    ts = torch.where(keep, t * s, torch.zeros_like(s)).sum(-1)
    return torch.xlogy(t, t).sum(-1) - ts + lse


def ref_reduce(rows, reduction, batch):
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / rows.numel()
    assert reduction == "batchmean"
    return total / batch


# --------------------------------------------------------------------------------------------------
# attention_kl_qk: the same KL on materialized logits scale * q k^T (teacher: dense or q_t k_t^T)
# --------------------------------------------------------------------------------------------------

def ref_student_logits(q, k, scale=None):
    """scale * q k^T in float64, (B, H, M, N) (differentiable; ``scores``)."""
    return scores(q, k, scale)


def ref_teacher_logits(q_t, k_t, scale_t=None):
    """scale_t * q_t k_t^T in float64, detached, (B, Ht, M, N) (Ht = 1 broadcasts over the student's
    heads); scale_t defaults to Dt ** -0.5."""
    return scores(q_t.detach(), k_t.detach(), scale_t)


def ref_kl_qk_rows(q, k, target, *, scale=None, scale_t=None, target_is="probs", temperature=1.0, key_mask=None,
                   direct=False):
    """Per-row KL of attention_kl_qk: target a dense tensor (of kind target_is) or a (q_t, k_t) pair."""
    s = ref_student_logits(q, k, scale)
    if isinstance(target, (tuple, list)):
        target, target_is = ref_teacher_logits(*target, scale_t), "logits"
    fn = ref_kl_rows_direct if direct else ref_kl_rows
    return fn(s, target, target_is, temperature, key_mask)


# --------------------------------------------------------------------------------------------------
# The KL fused into the attention pass (interaction_attention(..., kl_target=t))
# --------------------------------------------------------------------------------------------------

def ref_fused_kl_rows(q, k, target, attn_mask=None, is_causal=False, scale=None):
    """Per-row KL(target over the attended keys, renormalised || softmax of the masked scores)."""
    s = masked_scores(q, k, attn_mask, is_causal, scale)
    keep = s > NEG_INF
    return ref_kl_rows(torch.where(keep, s, torch.zeros_like(s)), target, "probs", 1.0, key_mask=keep)


# --------------------------------------------------------------------------------------------------
# Eager references of the numerics contract (README "Numerics"): NaN and inf propagate as in eager
# PyTorch, unlike the references above, which zero rows without a kept key or target mass by design
# --------------------------------------------------------------------------------------------------

def eager_attention(q, k, v, mask=None, is_causal=False, scale=None):
    """float64 eager attention (differentiable): out (B, H, M, Dv), P (B, H, M, N). Bool mask and
    causal by masked_fill(-inf), float mask added; with a mask, rows with no attended key (every
    score -inf) are zeros in out and P (the contract; eager gives NaN there)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else s + mask.double()
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), NEG_INF)
    # Only a mask can empty a row (top-left causal rows attend key 0); without one an all -inf row
    # comes from infinite q / k and is NaN, as eager.
    dead = (s == NEG_INF).all(-1, keepdim=True) & (mask is not None)
    p = torch.softmax(s, -1).masked_fill(dead, 0.0)
    return (p @ v).masked_fill(dead, 0.0), p


def eager_kl_rows(logits, target, target_is="probs", temperature=1.0, key_mask=None):
    """Per-row KL(t || softmax(logits / T)) over the kept keys, float64, via F.kl_div (differentiable
    w.r.t. logits). t: probabilities renormalised over the kept keys (target / sum: NaN where the row
    holds NaN or +inf), or softmax of the logits / log-probabilities. Contract rules on top of
    F.kl_div: t = 0 terms give 0 (also against a student -inf), rows without a kept key or without
    target mass give 0, a row whose kept keys hold target mass but whose student logits are all -inf
    gives +inf (F.kl_div: NaN from log_softmax of an all -inf row)."""
    s = logits.double() / temperature
    keep = torch.ones_like(s, dtype=torch.bool) if key_mask is None else key_mask.to(s.device).expand(s.shape)
    t = target.double().expand(s.shape)
    if target_is == "probs":
        t = torch.where(keep, t, 0.0)
        mass = t.sum(-1, keepdim=True)
        t = t / torch.where(mass == 0, 1.0, mass)
    else:
        u = t / temperature if target_is == "logits" else t
        u = u.masked_fill(~keep, NEG_INF)
        t = torch.softmax(u, -1).nan_to_num(nan=NAN)
        t = torch.where((u == NEG_INF).all(-1, keepdim=True), 0.0, t)  # no kept key (softmax: NaN)
    s_kept = s.masked_fill(~keep, NEG_INF)
    student_dead = (s_kept == NEG_INF).all(-1, keepdim=True)
    logp = F.log_softmax(torch.where(student_dead, 0.0, s_kept), -1)  # finite stand-in, fixed below
    terms = torch.where(t == 0, 0.0, F.kl_div(logp, t, reduction="none"))
    kl = terms.sum(-1)
    has_mass = (t != 0).any(-1)
    return torch.where(student_dead.squeeze(-1) & has_mass & ~kl.isnan(), INF, kl)


def eager_target_probs(target, target_is, T, keep):
    """The target distribution over the kept keys `keep` (float64; NaN / inf propagate, as eager)."""
    t = target.double().expand(keep.shape)
    if target_is == "probs":
        t = torch.where(keep, t, 0.0)
        return t / t.sum(-1, keepdim=True)
    u = (t / T if target_is == "logits" else t).masked_fill(~keep, NEG_INF)
    return torch.softmax(u, -1)
