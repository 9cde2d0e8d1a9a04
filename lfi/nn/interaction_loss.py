"""InteractionLoss: KL(teacher map || student query map), averaged over layers, heads and queries.

For each supervised layer l, each image b and each query j that is assigned a teacher concept
c = a(b, j) that is valid for that image (weight w_bj = 1, else 0):

    KL_lbhj = KL( t_bc || softmax(scale_l * q_lbhj . k_lbh^T / T) )      over the Np patches

    heads="broadcast" (default): every head h of the query row matches the teacher map;
                                 row loss r_lbj = mean_h KL_lbhj
    heads="mean":                the head-averaged map matches it;
                                 r_lbj = KL( t_bc || mean_h softmax(...) )

    loss = sum_l alpha_l * [ sum_bj w_bj r_lbj / max(1, sum_bj w_bj) ] / sum_l alpha_l

i.e. the mean over (image, query) pairs that have a concept, of the head-mean KL, then the
(weighted, default uniform) mean over supervised layers. KL is in nats per map.

With heads="broadcast" the KL runs through ``lfi.ops.attention_kl_qk`` on the layer's (q rows,
patch keys): the student maps are never materialized. ``via="logits"`` forces
``lfi.ops.attention_kl`` on materialized logits (same value; for checking), and maps given as
tensors (captured probabilities) go through ``attention_kl`` on their logs.

Query-to-concept assignment (``assignment``):
  "fixed"      query j <-> concept j (needs K >= number of concepts; extra queries are free).
  "topk"       per image, the K concepts with the highest teacher score, in score order.
  "hungarian"  per image, scipy.optimize.linear_sum_assignment on the cost C[j, c] = KL(t_c || p_j)
               averaged over heads and supervised layers (computed without gradient); candidate
               concepts are the valid ones (and, when there are more concepts than queries and the
               teacher gives scores, the K best scored).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lfi.ops import attention_kl, attention_kl_qk, interaction_attention

__all__ = ["InteractionLoss", "ASSIGNMENTS", "assign_concepts"]

ASSIGNMENTS = ("fixed", "topk", "hungarian")
HEAD_MODES = ("broadcast", "mean")
_BIG = 1e9


def _teacher_parts(teacher, grid):
    """-> probs (B, Kt, Np), valid (B, Kt) bool or None, scores (B, Kt) or None."""
    if isinstance(teacher, Tensor):
        if teacher.dim() == 4:
            teacher = teacher.flatten(2)
        if teacher.dim() != 3:
            raise ValueError(f"teacher maps must be (B, Kt, Np) or (B, Kt, h, w), got {tuple(teacher.shape)}")
        return teacher, None, None
    if not hasattr(teacher, "probs"):
        raise TypeError(f"teacher must be a tensor of maps or a TeacherMaps, got {type(teacher).__name__}")
    probs = teacher.flat(grid) if (grid is not None and hasattr(teacher, "flat")) else teacher.probs.flatten(2)
    return probs, getattr(teacher, "valid", None), getattr(teacher, "scores", None)


def _layers_of(query_maps):
    """-> (list of layer entries, grid or None). Entries: LayerMaps-like (q, k, scale) or tensors (B, H, K, Np)."""
    if isinstance(query_maps, Tensor):
        entries = [query_maps] if query_maps.dim() == 4 else list(query_maps.unbind(1))
        return entries, None
    grid = getattr(query_maps, "grid", None)
    entries = list(query_maps.layers) if hasattr(query_maps, "layers") else list(query_maps)
    if not entries:
        raise ValueError("query_maps has no supervised layer")
    return entries, (tuple(grid) if grid and grid[0] else None)


def _row_kl_pairs(entry, targets: Tensor, temperature: float) -> Tensor:
    """KL(targets[b, j, c] || p_bj) averaged over heads, for all (j, c): (B, K, C). No grad."""
    B, K, C, N = targets.shape
    if isinstance(entry, Tensor):
        logp = torch.log(entry.float().clamp_min(1e-30))  # (B, H, K, N)
        H = logp.shape[1]
        s = logp.unsqueeze(3).expand(B, H, K, C, N).reshape(B, H, K * C, N)
        kl = attention_kl(s, targets.reshape(B, 1, K * C, N), temperature=temperature, reduction="none")
    else:
        H = entry.q.shape[1]
        q = entry.q.unsqueeze(3).expand(-1, -1, -1, C, -1).reshape(B, H, K * C, -1)
        kl = attention_kl_qk(q, entry.k, targets.reshape(B, 1, K * C, N).to(q.dtype), scale=entry.scale,
                             temperature=temperature, reduction="none")
    return kl.float().mean(1).reshape(B, K, C)


@torch.no_grad()
def assign_concepts(assignment: str, entries, probs: Tensor, valid: Optional[Tensor], scores: Optional[Tensor],
                    num_queries: int, temperature: float = 1.0):
    """-> (index (B, K) long into the concepts, weight (B, K) float in {0, 1})."""
    B, Kt, N = probs.shape
    K = num_queries
    dev = probs.device
    valid = torch.ones(B, Kt, dtype=torch.bool, device=dev) if valid is None else valid.to(dev).bool()
    index = torch.zeros(B, K, dtype=torch.long, device=dev)
    weight = torch.zeros(B, K, dtype=torch.float32, device=dev)
    if assignment == "fixed":
        if Kt > K:
            raise ValueError(
                f"assignment='fixed' maps query i to concept i but there are {Kt} concepts for {K} queries: "
                "use more queries, fewer concepts, or assignment='topk' / 'hungarian'")
        index[:, :Kt] = torch.arange(Kt, device=dev)
        weight[:, :Kt] = valid.float()
        return index, weight
    if assignment == "topk":
        s = (scores.float() if scores is not None else valid.float()).to(dev).masked_fill(~valid, -math.inf)
        n = min(K, Kt)
        top = s.topk(n, dim=1)
        index[:, :n] = top.indices
        weight[:, :n] = torch.isfinite(top.values).float()
        return index, weight
    if assignment != "hungarian":
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    from scipy.optimize import linear_sum_assignment

    cand = valid.clone()
    if Kt > K and scores is not None:
        s = scores.float().to(dev).masked_fill(~valid, -math.inf)
        keep = torch.zeros_like(cand)
        keep.scatter_(1, s.topk(K, dim=1).indices, True)
        cand &= keep
    targets = probs.float().unsqueeze(1).expand(B, K, Kt, N)
    cost = sum(_row_kl_pairs(e, targets, temperature) for e in entries) / len(entries)  # (B, K, Kt)
    cost = cost.masked_fill(~cand.unsqueeze(1), _BIG).cpu().double().numpy()
    cand_cpu = cand.cpu()
    for b in range(B):
        rows, cols = linear_sum_assignment(cost[b])
        for j, c in zip(rows.tolist(), cols.tolist()):
            index[b, j] = c
            weight[b, j] = float(cand_cpu[b, c])
    return index, weight


class InteractionLoss(nn.Module):
    """KL(teacher || student query maps); see the module docstring for the exact averaging.

    Args:
        assignment: "fixed" | "topk" | "hungarian" (query-to-concept matching).
        heads: "broadcast" (each head matches the teacher map) or "mean" (the head-mean map does).
        temperature: student logits are divided by it (teacher probabilities are used as given).
        layer_weights: optional per-supervised-layer weights alpha_l (default uniform).
        via: "qk" (attention_kl_qk, maps never materialized; default) or "logits" (attention_kl on
            materialized logits). Ignored for heads="mean" (needs the maps).
        backend: lfi op backend ("auto").

    Call: ``loss = InteractionLoss()(query_maps, teacher_maps)`` where query_maps is the QueryMaps
    of ``InteractionViT(..., return_maps=True)`` (or captured maps (B, H, K, Np) / a list of them)
    and teacher_maps a TeacherMaps or a (B, Kt, Np) tensor of probabilities. After a call,
    ``self.last_assignment`` holds (index (B, K), weight (B, K)).
    """

    def __init__(self, assignment: str = "fixed", heads: str = "broadcast", temperature: float = 1.0,
                 layer_weights: Optional[Sequence[float]] = None, via: str = "qk", backend: str = "auto"):
        super().__init__()
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        if heads not in HEAD_MODES:
            raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
        if via not in ("qk", "logits"):
            raise ValueError(f"via must be 'qk' or 'logits', got {via!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.assignment, self.heads, self.temperature = assignment, heads, float(temperature)
        self.via, self.backend = via, backend
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.last_assignment = None

    def _layer_rows(self, entry, target4: Tensor) -> Tensor:
        """Per-(b, j) row loss (B, K) for one layer; target4 (B, 1, K, Np)."""
        T = self.temperature
        if isinstance(entry, Tensor):  # captured probabilities (B, H, K, Np)
            if self.heads == "mean":
                logp = torch.log(entry.mean(1, keepdim=True).float().clamp_min(1e-30))
                return attention_kl(logp, target4.float(), reduction="none", backend=self.backend)[:, 0]
            logp = torch.log(entry.float().clamp_min(1e-30))
            kl = attention_kl(logp, target4.float(), temperature=T, reduction="none", backend=self.backend)
            return kl.mean(1)
        q, k = entry.q, entry.k
        if self.heads == "mean":
            v = getattr(entry, "v", None)
            v = k[..., :1] if v is None else v
            _, p = interaction_attention(q, k, v, scale=entry.scale / T, need_weights=True, backend=self.backend)
            logp = torch.log(p.float().mean(1, keepdim=True).clamp_min(1e-30))
            return attention_kl(logp, target4.float(), reduction="none", backend=self.backend)[:, 0]
        t = target4.to(q.dtype)
        if self.via == "logits":
            logits = torch.matmul(q, k.transpose(-1, -2)) * entry.scale
            kl = attention_kl(logits, t, temperature=T, reduction="none", backend=self.backend)
        else:
            kl = attention_kl_qk(q, k, t, scale=entry.scale, temperature=T, reduction="none", backend=self.backend)
        return kl.float().mean(1)

    def forward(self, query_maps, teacher) -> Tensor:
        entries, grid = _layers_of(query_maps)
        probs, valid, scores = _teacher_parts(teacher, grid)
        first = entries[0]
        B, K, N = (first.shape[0], first.shape[2], first.shape[3]) if isinstance(first, Tensor) else \
            (first.q.shape[0], first.q.shape[2], first.k.shape[2])
        if probs.shape[0] != B:
            raise ValueError(f"teacher maps have batch {probs.shape[0]} but the student {B}")
        if probs.shape[-1] != N:
            raise ValueError(
                f"teacher maps have {probs.shape[-1]} patches but the student's query maps {N}: give the teacher "
                "the student's grid (or a TeacherMaps, which is resized to the student's grid)")
        probs = probs.detach()
        index, weight = assign_concepts(self.assignment, entries, probs, valid, scores, K, self.temperature)
        self.last_assignment = (index, weight)
        target = probs.gather(1, index.unsqueeze(-1).expand(B, K, N)).unsqueeze(1)  # (B, 1, K, N)
        denom = weight.sum().clamp_min(1.0)
        alphas = self.layer_weights or [1.0] * len(entries)
        if len(alphas) != len(entries):
            raise ValueError(f"layer_weights has {len(alphas)} entries for {len(entries)} supervised layers")
        total = 0.0
        for a, e in zip(alphas, entries):
            rows = self._layer_rows(e, target)
            total = total + a * (rows * weight).sum() / denom
        return total / sum(alphas)

    def extra_repr(self) -> str:
        return f"assignment={self.assignment!r}, heads={self.heads!r}, temperature={self.temperature}, via={self.via!r}"
