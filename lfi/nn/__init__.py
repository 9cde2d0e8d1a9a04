"""nn.Modules built on lfi's fused attention.

* ``InteractionAttention`` — ``timm.layers.Attention`` drop-in (needs timm; imported lazily).
* ``MultiheadAttention`` — ``torch.nn.MultiheadAttention`` drop-in.
  (Both override only ``forward``, keep the state dict, and support ``lfi.capture_attention``.)
* ``InteractionQueries``, ``InteractionLoss`` — the LFI training layer (lfi.nn.interaction_*).

Names are resolved on first access, so ``import lfi.nn`` imports neither timm nor the training code.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "InteractionAttention": "lfi.nn.timm_attention",
    "MultiheadAttention": "lfi.nn.multihead_attention",
    "InteractionQueries": "lfi.nn.interaction_queries",
    "InteractionLoss": "lfi.nn.interaction_loss",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as exc:
            if name == "InteractionAttention":
                raise ImportError(
                    "lfi.nn.InteractionAttention needs timm: pip install 'lfi[integrations]' (or pip install timm)"
                ) from exc
            raise
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lfi.nn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
