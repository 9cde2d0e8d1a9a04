"""Interaction queries: K learnable queries that persist across the blocks of a timm ViT.

The queries reuse each block's own weights (norm1, attn.qkv, q_norm/k_norm, attn.proj, ls1/ls2,
drop_path, norm2, mlp), so the only new parameters are the K query vectors (plus, with gated
read-back, one scalar per block). In block l, with tokens x (B, L, C) (P prefix tokens such as
CLS/registers, then Np patch tokens) and query states z (B, K, C):

    h = norm1([x; z])                       one qkv projection for tokens and queries
    tokens  attend tokens                   (and the queries too when read_back is on)
    queries attend the Np patch tokens only (prefix tokens and other queries are masked out)
    [x; z] += ls1(proj(attention out));  [x; z] += ls2(mlp(norm2([x; z])))

The query rows' attention maps P_l = softmax(scale * q_z k_patch^T) (B, H, K, Np) are what the
teacher supervises. Every query-row attention runs through ``lfi.interaction_attention``; the maps
are only written when asked for (``weights_rows`` = the query rows, columns sliced to the patches).
For the KL loss the per-layer (q_rows, k_patches) are kept instead, so ``attention_kl_qk`` never
materializes the maps.

Without read-back the tokens never see the queries, so the token stream is bit-for-bit the plain
ViT's and the queries can be dropped at inference at no cost. The token rows then run through
``F.scaled_dot_product_attention`` and the K query rows through ``interaction_attention`` as a
(K x Np) cross-attention, which equals the masked joint attention exactly and is cheaper. With
read-back the joint (L+K) sequence runs through ``interaction_attention`` with a mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfi.ops import interaction_attention

__all__ = ["InteractionQueries", "LayerMaps", "QueryMaps", "query_block_forward", "check_block"]


@dataclass
class LayerMaps:
    """One supervised layer's query attention, kept as (q, k) so the maps need not exist.

    q: (B, H, K, D) query rows after q_norm; k: (B, H, Np, D) patch keys after k_norm;
    v: (B, H, Np, Dv) patch values (only to recompute the maps through interaction_attention);
    scale: the block's logit scale; probs: (B, H, K, Np) exact maps, present when the forward was
    asked to materialize them (else computed on first access of ``maps``).
    """

    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    probs: Optional[Tensor] = None

    @property
    def maps(self) -> Tensor:
        """(B, H, K, Np) softmax maps of the query rows over the patch tokens (differentiable)."""
        if self.probs is None:
            _, self.probs = interaction_attention(self.q, self.k, self.v, scale=self.scale, need_weights=True)
        return self.probs

    def logits(self) -> Tensor:
        """(B, H, K, Np) pre-softmax scores scale * q k^T (materialized; for inspection)."""
        return torch.matmul(self.q, self.k.transpose(-1, -2)) * self.scale


@dataclass
class QueryMaps:
    """Per-supervised-layer query attention of an InteractionViT forward.

    ``layers[i]`` is a LayerMaps; ``grid`` the (rows, cols) patch grid (Np = rows * cols).
    Iterating yields the LayerMaps; ``stack()`` returns the materialized maps (B, Ls, H, K, Np).
    """

    layers: list = field(default_factory=list)
    grid: tuple = (0, 0)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i) -> LayerMaps:
        return self.layers[i]

    @property
    def layer_ids(self) -> list:
        return [lm.layer for lm in self.layers]

    def stack(self) -> Tensor:
        return torch.stack([lm.maps for lm in self.layers], 1)


def check_block(block: nn.Module, index: int) -> None:
    """Raises TypeError unless `block` is a pre-norm timm ViT block whose attention has a fused qkv."""
    attn = getattr(block, "attn", None)
    missing = [n for n in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2") if not hasattr(block, n)]
    if attn is not None:
        missing += [f"attn.{n}" for n in ("qkv", "proj", "num_heads", "head_dim", "scale") if not hasattr(attn, n)]
    else:
        missing.append("attn")
    if missing:
        raise TypeError(
            f"block {index} ({type(block).__name__}) is not a supported timm ViT block: missing {missing}. "
            "InteractionViT supports the timm VisionTransformer family with pre-norm `Block`s "
            "(norm1 -> attn(qkv, q_norm, k_norm, proj) -> ls1, norm2 -> mlp -> ls2)."
        )
    from timm.models.vision_transformer import Block

    if not isinstance(block, Block):
        raise TypeError(
            f"block {index} is a {type(block).__name__}, not timm's pre-norm vision_transformer.Block "
            "(post-norm / parallel blocks compute differently and are not supported)"
        )


def _project(attn: nn.Module, h: Tensor):
    B, T, _ = h.shape
    H, Dh = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(h).reshape(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k, v


def _attn_out(attn: nn.Module, o: Tensor, h: Tensor) -> Tensor:
    """timm Attention's tail: (B, H, T, Dh) -> norm -> gate -> proj -> proj_drop."""
    B, _, T, _ = o.shape
    o = o.transpose(1, 2).reshape(B, T, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        o = norm(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(h).sigmoid()
    return attn.proj_drop(attn.proj(o))


def query_block_forward(
    block: nn.Module, x: Tensor, z: Tensor, num_prefix: int, *, read_back: bool = False,
    read_back_bias: Optional[Tensor] = None, keep: bool = False, materialize: bool = False,
    layer: int = -1, backend: str = "auto",
):
    """Runs one timm ``Block`` on tokens x (B, L, C) and queries z (B, K, C) with shared weights.

    Returns (x, z, LayerMaps or None). With ``keep`` the query rows' (q, k, v) over the patch tokens
    are returned; with ``materialize`` also their exact maps (B, H, K, Np), written by
    ``interaction_attention`` (``weights_rows`` = the query rows). ``read_back`` lets the tokens
    attend the queries (``read_back_bias``: an optional learnable scalar added to those scores).
    """
    attn = block.attn
    B, L, C = x.shape
    K = z.shape[1]
    P = num_prefix
    xz = torch.cat([x, z], 1)
    h = block.norm1(xz)
    q, k, v = _project(attn, h)
    drop = attn.attn_drop.p if (block.training and isinstance(attn.attn_drop, nn.Dropout)) else 0.0
    want = materialize and keep
    if read_back:
        T = L + K
        rows = torch.arange(T, device=x.device)
        is_query_row = rows[:, None] >= L
        col_patch = (rows[None, :] >= P) & (rows[None, :] < L)
        col_query = rows[None, :] >= L
        allowed = col_patch | ~is_query_row  # (T, T): tokens attend everything, queries the patches only
        if read_back_bias is not None:
            bias = torch.zeros(T, T, device=x.device, dtype=q.dtype)
            bias = torch.where(~is_query_row & col_query, read_back_bias.to(q.dtype).expand(T, T), bias)
            mask = bias.masked_fill(~allowed, float("-inf"))
        else:
            mask = allowed
        res = interaction_attention(
            q, k, v, mask, dropout_p=drop, scale=attn.scale, need_weights=want,
            weights_rows=(L, T) if want else None, backend=backend,
        )
        o, w = (res if want else (res, None))
        out = _attn_out(attn, o, h)
        probs = w[..., P:L] if want else None
        q_rows = q[:, :, L:]
    else:
        o_x = F.scaled_dot_product_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], dropout_p=drop, scale=attn.scale)
        res = interaction_attention(
            q[:, :, L:], k[:, :, P:L], v[:, :, P:L], dropout_p=drop, scale=attn.scale, need_weights=want,
            backend=backend,
        )
        o_z, probs = (res if want else (res, None))
        out = _attn_out(attn, torch.cat([o_x, o_z], 2), h)
        q_rows = q[:, :, L:]
    xz = xz + block.drop_path1(block.ls1(out))
    xz = xz + block.drop_path2(block.ls2(block.mlp(block.norm2(xz))))
    maps = None
    if keep:
        maps = LayerMaps(layer, q_rows, k[:, :, P:L], v[:, :, P:L], float(attn.scale), probs)
    return xz[:, :L], xz[:, L:], maps


class InteractionQueries(nn.Module):
    """K learnable query vectors (K, C) that persist across ViT blocks (see module docstring).

    Args:
        num_queries: K.
        dim: the ViT width C.
        num_layers: number of blocks the queries may traverse (sizes the optional read-back gates).
        read_back: "off" (tokens never see the queries), "on" (tokens attend the queries through
            the joint masked attention) or "gated" (as "on", plus a learnable per-block scalar added
            to the token->query scores, initialised to ``gate_init``).
        init_std: normal init of the queries.
    """

    def __init__(self, num_queries: int, dim: int, num_layers: int, *, read_back: str = "off",
                 init_std: float = 0.02, gate_init: float = 0.0):
        super().__init__()
        if not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
        if read_back not in ("off", "on", "gated"):
            raise ValueError(f"read_back must be 'off', 'on' or 'gated', got {read_back!r}")
        self.num_queries, self.dim, self.read_back = num_queries, dim, read_back
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * init_std)
        self.gates = nn.Parameter(torch.full((num_layers,), float(gate_init))) if read_back == "gated" else None

    def initial(self, batch: int, dtype: torch.dtype) -> Tensor:
        return self.queries.to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def forward(self, block: nn.Module, layer: int, x: Tensor, z: Tensor, num_prefix: int, *, keep: bool = False,
                materialize: bool = False, backend: str = "auto"):
        """One block on tokens and queries; see ``query_block_forward``."""
        return query_block_forward(
            block, x, z, num_prefix, read_back=self.read_back != "off",
            read_back_bias=self.gates[layer] if self.gates is not None else None,
            keep=keep, materialize=materialize, layer=layer, backend=backend,
        )

    def extra_repr(self) -> str:
        return f"num_queries={self.num_queries}, dim={self.dim}, read_back={self.read_back!r}"
