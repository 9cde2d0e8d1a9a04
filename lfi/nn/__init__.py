"""nn.Modules built on lfi's fused attention.

* ``InteractionAttention`` — ``timm.layers.Attention`` drop-in (needs timm; imported lazily);
  ``LfiAttentionRope``, ``LfiEvaAttention``, ``LfiRelPosAttention``, ``LfiAttentionPoolLatent``,
  ``LfiRotAttentionPool2d``, ``LfiTimmAttentionPool2d`` — timm's RoPE / EVA / relative-position
  attention and attention pooling, converted.
* ``MultiheadAttention`` — ``torch.nn.MultiheadAttention`` drop-in.
  (Both override only ``forward``, keep the state dict, and support ``lfi.capture_attention``.)
* ``InteractionQueries``, ``InteractionLoss`` — the LFI training layer (lfi.nn.interaction_*).

Names are resolved on first access, so ``import lfi.nn`` imports neither timm nor the training code.
"""
from __future__ import annotations

from lfi._lazy import lazy_names

_TIMM = ("InteractionAttention", "LfiAttentionRope", "LfiEvaAttention", "LfiRelPosAttention", "LfiAttentionPoolLatent",
         "LfiRotAttentionPool2d", "LfiTimmAttentionPool2d")
__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {**{name: "lfi.nn.timm_attention" for name in _TIMM},
     "MultiheadAttention": "lfi.nn.multihead_attention",
     "InteractionQueries": "lfi.nn.interaction_queries",
     "InteractionLoss": "lfi.nn.interaction_loss"},
    hints={name: f"lfi.nn.{name} needs timm: pip install 'lfi[integrations]' (or pip install timm)" for name in _TIMM},
)
