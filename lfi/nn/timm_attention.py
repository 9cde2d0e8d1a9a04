"""`InteractionAttention`: timm's ``Attention`` with lfi's fused attention (and exact maps).

A subclass of ``timm.layers.Attention`` that overrides only ``forward``: same parameters, same
state dict (pretrained timm weights load unchanged), same constructor. Use it

* as a layer type: ``timm.create_model("vit_base_patch16_224", attn_layer=InteractionAttention)``,
* or by swapping the class of existing modules: ``lfi.integrations.timm.patch(model)``.

A call that asks for no maps (no capture, no hooks on ``attn_drop``) on backend "auto" (the
``lfi_backend`` attribute and ``LFI_BACKEND``) runs timm's own ``Attention.forward``: the outputs
are bit-identical to the unpatched module's. Under ``torch.jit.script`` the module compiles timm's
forward (so a scripted module is timm's scripted module, without maps); ``torch.jit.trace`` records
timm's forward for the same reason.

Otherwise ``forward`` mirrors timm 1.0's ``Attention.forward`` (fused qkv, optional gate, q/k norm,
``attn_mask`` bool (True = attend) or additive float, ``is_causal``, ``attn_drop`` probability as
dropout in training, ``norm`` (scale_norm), ``proj``, ``proj_drop``), but the attention itself runs
``lfi.interaction_attention``. Maps are computed only when asked for:

* by ``lfi.capture_attention`` (only the requested query rows), or
* when hooks are registered on ``self.attn_drop`` (as ``timm.utils.AttentionExtract(method="hook")``
  does): the full maps are then passed through ``self.attn_drop`` exactly like timm's eager path,
  so the hooks see the softmax maps (in training with ``attn_drop.p > 0`` the output is then
  ``attn_drop(maps) @ v``, the same dropout draw the hooks saw, exactly as in timm's eager path).

Under ``torch.fx`` symbolic tracing (``AttentionExtract(method="fx")``, timm feature extraction)
the maps come from a leaf call named ``softmax`` followed by ``self.attn_drop`` and ``attn @ v``,
so the graph has the node names of timm's eager path (``*attn.softmax``, ``*attn.attn_drop``).

The backend is the instance/class attribute ``lfi_backend`` ("auto", "torch", "triton" or "cuda";
see ``lfi._dispatch``).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.fx
from timm.layers import Attention

from lfi.capture import attend
from lfi.integrations._common import SDPAAttention, runs_original, script_copy
from lfi.ops.interaction_attention import interaction_attention

__all__ = ["InteractionAttention", "LfiAttentionRope", "LfiEvaAttention", "LfiRelPosAttention",
           "LfiAttentionPoolLatent", "LfiRotAttentionPool2d", "LfiTimmAttentionPool2d", "TIMM_CONVERSIONS",
           "has_forward_hooks", "softmax"]

try:  # timm's own tracer only treats registered functions as leaves
    from timm.layers._fx import register_notrace_function as _register_notrace_function
except Exception:  # pragma: no cover - older/newer timm layouts
    def _register_notrace_function(fn):
        return fn


def _is_fx_symbolic_tracing() -> bool:
    fn = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)
    return fn() if fn is not None else torch.fx._symbolic_trace.is_fx_tracing()


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """True when a forward (pre-)hook would fire for `module` (its own or a global one)."""
    from torch.nn.modules import module as _m
    return bool(
        module._forward_hooks or module._forward_pre_hooks
        or _m._global_forward_hooks or _m._global_forward_pre_hooks
    )


@torch.fx.wrap
def softmax(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
            scale: float, backend: str) -> torch.Tensor:
    """The exact attention maps softmax(scale q k^T + mask) (B, H, M, N) from the fused op.

    A leaf for torch.fx (named like the ``softmax`` node of timm's eager attention so that node
    patterns such as ``*attn.softmax`` keep matching)."""
    if is_causal:
        attn_mask = None  # timm: is_causal and attn_mask are exclusive, is_causal wins
    v = k.new_zeros(k.shape[:-1] + (1,))  # the maps do not depend on the values
    _, w = interaction_attention(q, k, v, attn_mask, 0.0, is_causal, scale, need_weights=True, backend=backend)
    return w


_register_notrace_function(softmax)


class InteractionAttention(Attention):
    """timm ``Attention`` whose attention runs through ``lfi.interaction_attention``."""

    _lfi_attention = True
    lfi_backend: str = "auto"
    _lfi_orig_forward = script_copy(Attention.forward)  # what TorchScript compiles

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        # TorchScript drops the branch it does not take, so _lfi_forward is never compiled
        if not torch.jit.is_scripting():
            return self._lfi_forward(x, attn_mask, is_causal)
        return self._lfi_orig_forward(x, attn_mask, is_causal)

    def _lfi_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        fx_tracing = _is_fx_symbolic_tracing()
        if not fx_tracing and runs_original(self) and not has_forward_hooks(self.attn_drop):
            return self._lfi_orig_forward(x, attn_mask, is_causal)  # nothing asks for maps: timm's own path
        B, N, C = x.shape
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if fx_tracing:
            attn = softmax(q, k, attn_mask, is_causal, self.scale, self.lfi_backend)
            attn = self.attn_drop(attn)
            x = attn @ v
        else:
            if is_causal:
                attn_mask = None  # timm: is_causal and attn_mask are exclusive, is_causal wins
            dropout_p = self.attn_drop.p if self.training else 0.0
            # hooks on attn_drop see the full maps, as in timm's eager path
            hooked = has_forward_hooks(self.attn_drop)
            x, attn = attend(self, q, k, v, attn_mask, 0.0 if hooked else dropout_p, is_causal, self.scale,
                             all_rows=hooked)
            if hooked:
                dropped = self.attn_drop(attn)  # the hooks see what timm's eager path shows them
                if dropout_p > 0.0:
                    x = dropped @ v  # and, in training, the output uses that same dropout draw

        x = x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", self.num_heads * self.head_dim))
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


# --------------------------------------------------------------------------------------------------
# timm attention variants whose forward calls F.scaled_dot_product_attention once (behind fused_attn):
# converted by wrapping the call (lfi.integrations._common.SDPAAttention), their forward untouched
# --------------------------------------------------------------------------------------------------
def _timm_class(module: str, name: str) -> Optional[type]:
    """timm's class `module.name`, or None where this timm version lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the timm version
        return None


def _sdpa_variant(orig: Optional[type], doc: str, name: Optional[str] = None) -> Optional[type]:
    """class Lfi<orig>(SDPAAttention, orig), defined in this module under `name` (picklable by name)."""
    if orig is None:  # pragma: no cover - depends on the timm version
        return None
    name = name or f"Lfi{orig.__name__}"
    return type(name, (SDPAAttention, orig), {"__doc__": doc, "__module__": __name__, "__qualname__": name})


_ROPE_DOC = """timm ``{name}`` converted to lfi: its own forward (rotary embeddings applied to q/k, masks,
q/k norm, ...) with its single ``F.scaled_dot_product_attention`` call run by lfi when maps are
captured; otherwise (and under TorchScript) exactly timm's module. See ``SDPAAttention``."""

#: timm.layers.AttentionRope (EVA02 / PE / DINOv3-style ViTs): RoPE on q/k before the op
LfiAttentionRope = _sdpa_variant(_timm_class("timm.layers", "AttentionRope"), _ROPE_DOC.format(name="AttentionRope"))
#: timm.models.eva.EvaAttention: RoPE, optional separate q/k/v projections, sub-LN
LfiEvaAttention = _sdpa_variant(_timm_class("timm.models.eva", "EvaAttention"), _ROPE_DOC.format(name="EvaAttention"))
#: timm.models.vision_transformer_relpos.RelPosAttention: relative position bias as the float mask
LfiRelPosAttention = _sdpa_variant(_timm_class("timm.models.vision_transformer_relpos", "RelPosAttention"),
                                   _ROPE_DOC.format(name="RelPosAttention"))
#: timm.layers.AttentionPoolLatent: latent queries attending to the tokens (M latent rows, N tokens)
LfiAttentionPoolLatent = _sdpa_variant(_timm_class("timm.layers", "AttentionPoolLatent"),
                                       _ROPE_DOC.format(name="AttentionPoolLatent"))
#: timm.layers.RotAttentionPool2d / AttentionPool2d (CLIP-ResNet-style heads in byobnet): the mean (or
#: class) token and the H*W tokens attend to each other, with rotary / absolute position embeddings
LfiRotAttentionPool2d = _sdpa_variant(_timm_class("timm.layers", "RotAttentionPool2d"),
                                      _ROPE_DOC.format(name="RotAttentionPool2d"))
LfiTimmAttentionPool2d = _sdpa_variant(_timm_class("timm.layers", "AttentionPool2d"),
                                       _ROPE_DOC.format(name="AttentionPool2d"), name="LfiTimmAttentionPool2d")

#: timm class -> lfi class, for lfi.integrations.timm.patch
TIMM_CONVERSIONS: dict[type, type] = {Attention: InteractionAttention}
for _cls in (LfiAttentionRope, LfiEvaAttention, LfiRelPosAttention, LfiAttentionPoolLatent, LfiRotAttentionPool2d,
             LfiTimmAttentionPool2d):
    if _cls is not None:
        TIMM_CONVERSIONS[_cls.__mro__[2]] = _cls
