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

Only modules whose type is *exactly* ``timm.layers.Attention`` are converted (their class becomes
``lfi.nn.InteractionAttention``; parameters, buffers and the state dict are untouched). Other
attention classes (EVA, RoPE, DiffAttention, attention pools, ...) have their own forward: they are
listed in the returned ``PatchReport.skipped`` and a warning names them.
Alternatively build the model with ``timm.create_model(name, attn_layer=lfi.nn.InteractionAttention)``.
"""
from __future__ import annotations

from torch import nn

from lfi.integrations._common import (
    PatchReport,
    check_backend,
    looks_like_attention,
    set_backend,
    swap,
    unswap,
    warn_skipped,
)

try:
    from timm.layers import Attention as _TimmAttention
except ImportError as exc:  # pragma: no cover - exercised only without timm
    raise ImportError(
        "lfi.integrations.timm needs timm: pip install 'lfi[integrations]' (or pip install timm)"
    ) from exc

from lfi.nn.timm_attention import InteractionAttention

__all__ = ["patch", "unpatch", "InteractionAttention", "PatchReport"]


def patch(model: nn.Module, backend: str = "auto", warn: bool = True) -> PatchReport:
    """Converts, in place, every module of `model` whose type is exactly ``timm.layers.Attention``
    into ``lfi.nn.InteractionAttention`` (``m.__class__`` swap; reversible with ``unpatch``).

    Args:
        model: any nn.Module containing timm attention layers (the model itself may be one).
        backend: lfi backend for the converted modules ("auto", "torch", "triton" or "cuda"; see
            ``lfi._dispatch``); stored as the module attribute ``lfi_backend``.
        warn: warn when attention-like modules of other classes were left unconverted.

    Returns:
        PatchReport with the converted, already-converted and skipped module names.
    """
    check_backend(backend)
    report = PatchReport()
    for name, m in model.named_modules():
        cls = type(m)
        if cls is _TimmAttention:
            swap(m, InteractionAttention, backend)
            report.patched.append(name)
        elif getattr(cls, "_lfi_attention", False):
            set_backend(m, backend)
            report.already.append(name)
        elif isinstance(m, _TimmAttention):
            report.skipped.append((name, cls.__name__, "subclass of timm Attention with its own forward"))
        elif looks_like_attention(m):
            report.skipped.append((name, cls.__name__, "timm attention variant with its own forward"))
    if warn:
        warn_skipped(report, "lfi.integrations.timm.patch")
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Restores the original class of every module ``patch`` converted (and of modules built with
    ``attn_layer=InteractionAttention``, which become ``timm.layers.Attention``)."""
    report = PatchReport()
    for name, m in model.named_modules():
        if isinstance(m, InteractionAttention) and unswap(m, _TimmAttention):
            report.patched.append(name)
    return report
