"""open_clip drop-in: run both CLIP towers' attention through lfi's fused attention.

```python
model = open_clip.create_model("ViT-B-16", pretrained="/path/weights.safetensors")
lfi.integrations.open_clip.patch(model)
with lfi.capture_attention(model, layers=[-1], rows=0) as maps:
    image_features = model.encode_image(images)
lfi.integrations.open_clip.unpatch(model)
```

* ``ResidualAttentionBlock.attn`` (``nn.MultiheadAttention``: batch_first or not, q|k|v rows in
  ``in_proj_weight``) becomes ``lfi.nn.MultiheadAttention`` (same parameters; masks, including the
  text tower's additive causal float mask and its padding masks, are honoured).
* open_clip's own ``Attention`` (``CustomResidualAttentionBlock``: qk_norm, scaled cosine attention,
  head scaling, inner norm) becomes ``OpenCLIPAttention``.
* ``timm.layers.Attention`` in timm vision trunks (``vision_cfg.timm_model_name``) becomes
  ``lfi.nn.InteractionAttention`` (as ``lfi.integrations.timm.patch``).
* Other attention modules (e.g. the ``AttentionalPooler`` of CoCa / attentional-pool towers) are
  reported in ``PatchReport.skipped``; ``patch(model, all_mha=True)`` also converts every other
  plain ``nn.MultiheadAttention``.
``unpatch`` restores the original classes; outputs are unchanged up to floating-point rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lfi.capture import capture_rows, deliver
from lfi.integrations._common import (
    PatchReport,
    check_backend,
    set_backend,
    swap,
    unswap,
    warn_skipped,
)
from lfi.nn.multihead_attention import MultiheadAttention, mha_supported
from lfi.ops.interaction_attention import interaction_attention

try:
    from open_clip.transformer import Attention as _OCAttention
    from open_clip.transformer import ResidualAttentionBlock as _OCBlock
except ImportError as exc:  # pragma: no cover - exercised only without open_clip
    raise ImportError(
        "lfi.integrations.open_clip needs open_clip: pip install 'lfi[integrations]' (or pip install open_clip_torch)"
    ) from exc

__all__ = ["patch", "unpatch", "OpenCLIPAttention", "PatchReport"]


def _timm_attention_classes():
    """(timm Attention, lfi InteractionAttention) when timm is installed (timm vision trunks)."""
    try:
        from timm.layers import Attention

        from lfi.nn.timm_attention import InteractionAttention
    except ImportError:
        return None, None
    return Attention, InteractionAttention


class OpenCLIPAttention(_OCAttention):
    """open_clip ``Attention`` whose attention runs through ``lfi.interaction_attention``.

    Same math as open_clip's forward: bool masks there mean True = masked out (converted here);
    3-D masks are (N * num_heads, L, L); scaled cosine attention multiplies the normalized q by
    the clamped per-head logit scale (folded into q, the op then runs with scale 1)."""

    _lfi_attention = True
    lfi_backend: str = "auto"

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None):
        N, L, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q = q.reshape(N, L, self.num_heads, -1).transpose(1, 2)
        k = k.reshape(N, L, self.num_heads, -1).transpose(1, 2)
        v = v.reshape(N, L, self.num_heads, -1).transpose(1, 2)

        if attn_mask is not None:
            if attn_mask.ndim == 3:
                attn_mask = attn_mask.reshape(N, self.num_heads, L, L)
            attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype=q.dtype)

        if self.logit_scale is not None:
            logit_scale = torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            q = F.normalize(q, dim=-1) * logit_scale.to(q.dtype)
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            q, k = self.ln_q(q), self.ln_k(k)
            scale = self.scale

        rows = capture_rows(self, L)
        res = interaction_attention(
            q, k, v, attn_mask, self.attn_drop.p if self.training else 0.0, False, scale,
            need_weights=rows is not None, weights_rows=rows, backend=self.lfi_backend,
        )
        if rows is None:
            x = res
        else:
            x, attn = res
            deliver(self, attn, L, rows[0])

        if self.head_scale is not None:
            x = x * self.head_scale
        x = x.transpose(1, 2).reshape(N, L, C)
        x = self.ln_inner(x)
        x = self.out_proj(x)
        x = self.out_drop(x)
        return x


def patch(model: nn.Module, backend: str = "auto", all_mha: bool = False, warn: bool = True) -> PatchReport:
    """Converts, in place, the attention of every open_clip transformer block of `model`.

    Args:
        model: an open_clip model (CLIP, CustomTextCLIP, CoCa, or one tower / block).
        backend: lfi backend of the converted modules ("auto", "torch", "triton" or "cuda"; see
            ``lfi._dispatch``); stored as the module attribute ``lfi_backend``.
        all_mha: also convert plain ``nn.MultiheadAttention`` modules outside
            ``ResidualAttentionBlock`` (e.g. attentional poolers).
        warn: warn when attention modules were left unconverted.
    """
    check_backend(backend)
    report = PatchReport()
    timm_attn, timm_lfi = _timm_attention_classes()
    in_block = {id(m.attn) for m in model.modules() if isinstance(m, _OCBlock)}
    for name, m in model.named_modules():
        cls = type(m)
        if getattr(cls, "_lfi_attention", False):
            set_backend(m, backend)
            report.already.append(name)
        elif cls is nn.MultiheadAttention:
            reason = mha_supported(m)
            if reason is not None:
                report.skipped.append((name, cls.__name__, reason))
            elif id(m) in in_block or all_mha:
                swap(m, MultiheadAttention, backend)
                report.patched.append(name)
            else:
                report.skipped.append((name, cls.__name__, "not in a ResidualAttentionBlock (patch with all_mha=True)"))
        elif cls is _OCAttention:
            swap(m, OpenCLIPAttention, backend)
            report.patched.append(name)
        elif timm_attn is not None and cls is timm_attn:  # timm vision trunk (TimmModel)
            swap(m, timm_lfi, backend)
            report.patched.append(name)
        elif isinstance(m, (nn.MultiheadAttention, _OCAttention)) or cls.__name__.endswith("Attention"):
            report.skipped.append((name, cls.__name__, "attention class with its own forward"))
    if warn:
        warn_skipped(report, "lfi.integrations.open_clip.patch")
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Restores the classes ``patch`` replaced."""
    report = PatchReport()
    timm_attn, timm_lfi = _timm_attention_classes()
    for name, m in model.named_modules():
        if isinstance(m, MultiheadAttention) and unswap(m, nn.MultiheadAttention):
            report.patched.append(name)
        elif isinstance(m, OpenCLIPAttention) and unswap(m, _OCAttention):
            report.patched.append(name)
        elif timm_lfi is not None and isinstance(m, timm_lfi) and unswap(m, timm_attn):
            report.patched.append(name)
    return report
