"""timm drop-in: run every ``timm.layers.Attention`` through lfi's fused attention.

```python
import timm, lfi
model = timm.create_model("vit_base_patch16_224")
report = lfi.integrations.timm.patch(model)      # every timm Attention now runs interaction_attention
with lfi.capture_attention(model, layers=[-1], rows=slice(0, 1)) as maps:
    logits = model(x)
maps[-1]                                          # (B, H, 1, N)
lfi.integrations.timm.unpatch(model)              # back to timm's class, bit for bit
```

Converted (``m.__class__`` swap; parameters, buffers and the state dict untouched; ``unpatch``
restores the classes):

* ``timm.layers.Attention`` (ViT, DeiT, BEiT-free ViTs, ...) -> ``lfi.nn.InteractionAttention``;
* ``timm.layers.AttentionRope`` (EVA02, PE, DINOv3-style ViTs: RoPE on q/k), ``EvaAttention``,
  ``RelPosAttention`` (relative position bias as the float mask), ``AttentionPoolLatent``
  (latent-query pooling, M != N) and the CLIP-ResNet-style ``RotAttentionPool2d`` /
  ``AttentionPool2d`` heads -> ``LfiAttentionRope`` / ``LfiEvaAttention`` / ``LfiRelPosAttention`` /
  ``LfiAttentionPoolLatent`` / ``LfiRotAttentionPool2d`` / ``LfiTimmAttentionPool2d``: their own
  forward runs, and only its ``F.scaled_dot_product_attention`` call goes through lfi while maps
  are captured.

Converted modules run timm's own forward when no maps are asked for (bit-identical outputs), and
TorchScript compiles timm's forward (``torch.jit.script`` / ``trace`` of a patched model give timm's
scripted / traced model). Every other module that looks like attention (q/k/v projections, an
``nn.MultiheadAttention``, a forward calling SDPA, a ``*Attention`` class: maxvit's partition
attention, DiffAttention, ...) is listed in the returned ``PatchReport.skipped`` with a warning.
Alternatively build the model with ``timm.create_model(name, attn_layer=lfi.nn.InteractionAttention)``.
"""
from __future__ import annotations

from torch import nn

from lfi.integrations._common import PatchReport, convert_modules, restore_modules

try:
    import timm  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without timm
    raise ImportError(
        "lfi.integrations.timm needs timm: pip install 'lfi[integrations]' (or pip install timm)"
    ) from exc

from lfi.nn.timm_attention import (
    TIMM_CONVERSIONS,
    InteractionAttention,
    LfiAttentionPoolLatent,
    LfiAttentionRope,
    LfiEvaAttention,
    LfiRelPosAttention,
    LfiRotAttentionPool2d,
    LfiTimmAttentionPool2d,
)

__all__ = ["patch", "unpatch", "InteractionAttention", "LfiAttentionRope", "LfiEvaAttention", "LfiRelPosAttention",
           "LfiAttentionPoolLatent", "LfiRotAttentionPool2d", "LfiTimmAttentionPool2d", "PatchReport", "CONVERSIONS"]

#: timm class -> the lfi class ``patch`` gives modules of exactly that class
CONVERSIONS = TIMM_CONVERSIONS
_ORIGINAL = {lfi_cls: cls for cls, lfi_cls in CONVERSIONS.items()}


def patch(model: nn.Module, backend: str = "auto", warn: bool = True) -> PatchReport:
    """Converts, in place, every module of `model` whose type is exactly one of ``CONVERSIONS``
    (``timm.layers.Attention``, ``AttentionRope``, ``AttentionPoolLatent``, ``EvaAttention``,
    ``RelPosAttention``, ``RotAttentionPool2d``, ``AttentionPool2d``) into its lfi class
    (``m.__class__`` swap; reversible with ``unpatch``).

    Args:
        model: any nn.Module containing timm attention layers (the model itself may be one).
        backend: lfi backend for the converted modules ("auto", "torch", "triton" or "cuda"; see
            ``lfi._dispatch``); stored as the module attribute ``lfi_backend``. With "auto", calls
            that ask for no maps run timm's own forward.
        warn: warn when attention-like modules were left unconverted.

    Returns:
        PatchReport with the converted, already-converted and skipped (attention-like, not
        converted: subclasses of the converted classes with their own forward, other variants)
        module names.
    """
    def unconverted_reason(m: nn.Module) -> str:
        if isinstance(m, tuple(CONVERSIONS)):
            return "subclass of a converted timm class, with its own forward"
        return "attention variant with its own forward"

    return convert_modules(model, backend, lambda m: (CONVERSIONS.get(type(m)), ""), unconverted_reason, warn,
                           "lfi.integrations.timm.patch")


def unpatch(model: nn.Module) -> PatchReport:
    """Restores the original class of every module ``patch`` converted (and of modules built with
    ``attn_layer=InteractionAttention``, which become ``timm.layers.Attention``)."""
    return restore_modules(model, _ORIGINAL.items())
