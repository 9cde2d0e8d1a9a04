"""`MultiheadAttention`: ``torch.nn.MultiheadAttention`` with lfi's fused attention.

A subclass that overrides only ``forward`` (same parameters and state dict), so existing modules can
be converted in place (``m.__class__ = MultiheadAttention``, see ``lfi.integrations.open_clip``) and
converted back. Semantics follow ``nn.MultiheadAttention.forward``:

* ``batch_first`` layouts, unbatched (L, E) inputs, packed ``in_proj_weight`` (q|k|v rows) or
  separate ``q/k/v_proj_weight`` (kdim/vdim), ``in_proj_bias``, ``out_proj``;
* ``attn_mask`` (L, S) or (B*H, L, S): bool True = *not* allowed (torch's MHA convention), float
  added to the scores; ``key_padding_mask`` (B, S) or (S): bool True = ignore, float added;
* ``is_causal`` is a hint that ``attn_mask`` is the causal mask (as in torch; it needs attn_mask);
* ``dropout`` on the probabilities in training;
* ``need_weights`` returns the maps, head-averaged (B, L, S) with ``average_attn_weights`` else
  (B, H, L, S) — computed exactly by the fused op. Unlike torch, the returned maps are taken
  *before* dropout, and a query row with every key masked gives zeros instead of NaN.

``add_bias_kv`` / ``add_zero_attn`` modules are not supported (forward falls back to torch's
implementation for them; ``lfi.integrations`` does not convert such modules).

A call that asks for no maps (``need_weights=False`` and no ``capture_attention`` of the module) on
backend "auto" (the ``lfi_backend`` attribute and ``LFI_BACKEND``) runs
``nn.MultiheadAttention.forward`` itself (including torch's inference fast path), so it is
bit-identical to the unconverted module. Under ``torch.jit.script`` the module compiles
``nn.MultiheadAttention.forward``, and ``torch.jit.trace`` records it: the scripted / traced module
is torch's (its maps, when ``need_weights=True``, are then torch's eager maps).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfi.capture import attend
from lfi.integrations._common import runs_original, script_copy

__all__ = ["MultiheadAttention", "mha_supported", "merge_masks"]


def mha_supported(m: nn.MultiheadAttention) -> Optional[str]:
    """None when `m` can run through lfi, else the reason it cannot."""
    if m.bias_k is not None or m.bias_v is not None:
        return "add_bias_kv=True is not supported"
    if m.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A float mask (0 / -inf) from a bool mask with True = attend; float masks pass through."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def merge_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], B: int, H: int, L: int,
                S: int, dtype: torch.dtype) -> Optional[Tensor]:
    """torch-MHA masks -> one lfi mask broadcastable to (B, H, L, S) (bool True = attend, or
    additive float); bool masks stay bool (no (B, H, L, S) float tensor is built for them)."""
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.reshape(B, H, L, S)
        elif attn_mask.dim() == 2:
            attn_mask = attn_mask.reshape(1, 1, L, S)
        else:
            raise ValueError(f"attn_mask must be (L, S) or (B*num_heads, L, S), got {tuple(attn_mask.shape)}")
        mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(B, 1, 1, S)
        kpm = ~kpm if kpm.dtype == torch.bool else kpm
        if mask is None:
            mask = kpm
        elif mask.dtype == torch.bool and kpm.dtype == torch.bool:
            mask = mask & kpm
        else:
            mask = _as_additive(mask, dtype) + _as_additive(kpm, dtype)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    return mask


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose attention runs through ``lfi.interaction_attention``."""

    _lfi_attention = True
    lfi_backend: str = "auto"
    _lfi_orig_forward = script_copy(nn.MultiheadAttention.forward)  # what TorchScript compiles

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        # TorchScript drops the branch it does not take, so _lfi_forward is never compiled
        if not torch.jit.is_scripting():
            return self._lfi_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                     average_attn_weights, is_causal)
        return self._lfi_orig_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                      average_attn_weights, is_causal)

    def _lfi_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                     need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
                     is_causal: bool) -> tuple[Tensor, Optional[Tensor]]:
        if mha_supported(self) is not None or torch.jit.is_tracing() or (not need_weights and runs_original(self)):
            # unsupported options, traced, or nothing asks for maps: torch's own forward, bit for bit
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S = key.shape[1]
        H, Dh = self.num_heads, self.head_dim

        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        causal = False
        if is_causal and key_padding_mask is None and not need_weights:
            # as torch: trust the hint and let the kernel skip the masked blocks
            attn_mask, causal = None, True

        # input projections (q|k|v rows of in_proj_weight)
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if query is key and key is value:
                q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
            else:
                w_q, w_k, w_v = w.chunk(3)
                b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
                q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        else:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)
        q = q.view(B, L, H, Dh).transpose(1, 2)
        k = k.view(B, S, H, Dh).transpose(1, 2)
        v = v.view(B, S, H, Dh).transpose(1, 2)

        mask = merge_masks(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        out, weights = attend(self, q, k, v, mask, self.dropout if self.training else 0.0, causal,
                              all_rows=need_weights)
        out = out.transpose(1, 2).reshape(B, L, H * Dh)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)

        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(1)
        if unbatched:
            weights = weights.squeeze(0)
        return out, weights
