"""open_clip drop-in: run both CLIP towers' attention through lfi's fused attention.

```python
model = open_clip.create_model("ViT-B-16", pretrained="/path/weights.safetensors")
lfi.integrations.open_clip.patch(model)
with lfi.capture_attention(model, layers=[-1], rows=0) as maps:
    image_features = model.encode_image(images)
lfi.integrations.open_clip.unpatch(model)
```

* ``ResidualAttentionBlock.attn`` (``nn.MultiheadAttention``: batch_first or not, q|k|v rows in
  ``in_proj_weight``) and the ``nn.MultiheadAttention`` of ``AttentionalPooler`` (CoCa /
  attentional-pool towers: n_queries latent queries attending to the tokens, kdim/vdim) become
  ``lfi.nn.MultiheadAttention`` (same parameters; masks, including the text tower's additive
  causal float mask and its padding masks, are honoured).
* open_clip's own ``Attention`` (``CustomResidualAttentionBlock``: qk_norm, scaled cosine attention,
  head scaling, inner norm) becomes ``OpenCLIPAttention``.
* RN50-style ``AttentionPool2d`` (``ModifiedResNet.attnpool``: the mean token plus the HW tokens
  attend to each other; row 0 is the pooled output) becomes ``LfiAttentionPool2d``.
* timm attention in timm vision trunks (``vision_cfg.timm_model_name``) is converted as
  ``lfi.integrations.timm.patch`` does.
* Other attention-like modules are reported in ``PatchReport.skipped``; ``patch(model,
  all_mha=True)`` also converts every other plain ``nn.MultiheadAttention``.

Calls that ask for no maps on backend "auto" run the original module's forward (open_clip's, or
torch's ``nn.MultiheadAttention.forward`` with its inference fast path): the outputs are
bit-identical to the unpatched model's, as open_clip's own inference tests demand. Under
``torch.jit.script`` (``create_model(..., jit=True)`` or ``torch.jit.script(model)``) the converted
modules compile their original forward. ``unpatch`` restores the original classes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lfi.capture import attend
from lfi.integrations._common import PatchReport, convert_modules, restore_modules, runs_original, script_copy
from lfi.nn.multihead_attention import MultiheadAttention, mha_supported

try:
    from open_clip.modified_resnet import AttentionPool2d as _OCAttentionPool2d
    from open_clip.transformer import Attention as _OCAttention
    from open_clip.transformer import AttentionalPooler as _OCPooler
    from open_clip.transformer import ResidualAttentionBlock as _OCBlock
except ImportError as exc:  # pragma: no cover - exercised only without open_clip
    raise ImportError(
        "lfi.integrations.open_clip needs open_clip: pip install 'lfi[integrations]' (or pip install open_clip_torch)"
    ) from exc

__all__ = ["patch", "unpatch", "OpenCLIPAttention", "LfiAttentionPool2d", "PatchReport"]


def _timm_conversions() -> dict:
    """timm class -> lfi class (timm vision trunks), empty without timm."""
    try:
        from lfi.nn.timm_attention import TIMM_CONVERSIONS
    except ImportError:
        return {}
    return TIMM_CONVERSIONS


class OpenCLIPAttention(_OCAttention):
    """open_clip ``Attention`` whose attention runs through ``lfi.interaction_attention``.

    Same math as open_clip's forward: bool masks there mean True = masked out (converted here);
    3-D masks are (N * num_heads, L, L); scaled cosine attention multiplies the normalized q by
    the clamped per-head logit scale (folded into q, the op then runs with scale 1)."""

    _lfi_attention = True
    lfi_backend: str = "auto"
    _lfi_orig_forward = script_copy(_OCAttention.forward)  # what TorchScript compiles

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # TorchScript drops the branch it does not take, so _lfi_forward is never compiled
        if not torch.jit.is_scripting():
            return self._lfi_forward(x, attn_mask)
        return self._lfi_orig_forward(x, attn_mask)

    def _lfi_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if runs_original(self):
            return self._lfi_orig_forward(x, attn_mask)  # nothing asks for maps: open_clip's own path
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

        x, _ = attend(self, q, k, v, attn_mask, self.attn_drop.p if self.training else 0.0, False, scale)
        if self.head_scale is not None:
            x = x * self.head_scale
        x = x.transpose(1, 2).reshape(N, L, C)
        x = self.ln_inner(x)
        x = self.out_proj(x)
        x = self.out_drop(x)
        return x


class LfiAttentionPool2d(_OCAttentionPool2d):
    """open_clip's RN50 ``AttentionPool2d`` (``F.multi_head_attention_forward`` over the mean token and
    the HW tokens, separate q/k/v projections) with its attention run by lfi when maps are captured.

    x (B, C, H, W) -> (B, output_dim), the output row of the mean token (query row 0): capture
    ``rows=0`` for the pooling map, (B, heads, 1, HW + 1)."""

    _lfi_attention = True
    lfi_backend: str = "auto"
    _lfi_orig_forward = script_copy(_OCAttentionPool2d.forward)  # what TorchScript compiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return self._lfi_forward(x)
        return self._lfi_orig_forward(x)

    def _lfi_forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_original(self):
            return self._lfi_orig_forward(x)
        x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        L, B, C = x.shape
        H = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (L, B, C) -> (B, H, L, C // H)
            return t.reshape(L, B, H, C // H).permute(1, 2, 0, 3)

        # F.multi_head_attention_forward's math: separate projections, scale 1/sqrt(head_dim)
        out, _ = attend(self, heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        out = out.permute(2, 0, 1, 3).reshape(L, B, C)
        return self.c_proj(out)[0]


def patch(model: nn.Module, backend: str = "auto", all_mha: bool = False, warn: bool = True) -> PatchReport:
    """Converts, in place, the attention of every open_clip transformer block, attentional pooler and
    RN50 attention pool of `model` (and of timm vision trunks).

    Args:
        model: an open_clip model (CLIP, CustomTextCLIP, CoCa, or one tower / block).
        backend: lfi backend of the converted modules ("auto", "torch", "triton" or "cuda"; see
            ``lfi._dispatch``); stored as the module attribute ``lfi_backend``. With "auto", calls
            that ask for no maps run the original forward.
        all_mha: also convert plain ``nn.MultiheadAttention`` modules outside
            ``ResidualAttentionBlock`` / ``AttentionalPooler``.
        warn: warn when attention modules were left unconverted.
    """
    timm_conv = _timm_conversions()
    owned = {id(m.attn) for m in model.modules() if isinstance(m, (_OCBlock, _OCPooler))}
    classes = {_OCAttention: OpenCLIPAttention, _OCAttentionPool2d: LfiAttentionPool2d, **timm_conv}

    def choose(m: nn.Module):
        if type(m) is nn.MultiheadAttention:
            reason = mha_supported(m)
            if reason is None and not (id(m) in owned or all_mha):
                reason = "not in a ResidualAttentionBlock or AttentionalPooler (patch with all_mha=True)"
            return (None, reason) if reason is not None else (MultiheadAttention, "")
        return classes.get(type(m)), ""  # timm_conv: timm vision trunks (TimmModel)

    return convert_modules(model, backend, choose, lambda m: "attention class with its own forward", warn,
                           "lfi.integrations.open_clip.patch")


def unpatch(model: nn.Module) -> PatchReport:
    """Restores the classes ``patch`` replaced."""
    originals = [(MultiheadAttention, nn.MultiheadAttention), (OpenCLIPAttention, _OCAttention),
                 (LfiAttentionPool2d, _OCAttentionPool2d)]
    return restore_modules(model, originals + [(lfi_cls, cls) for cls, lfi_cls in _timm_conversions().items()])
