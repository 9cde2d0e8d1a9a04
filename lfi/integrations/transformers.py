"""Hugging Face transformers drop-in: ``attn_implementation="lfi"``.

```python
import lfi, transformers
lfi.integrations.transformers.register()              # once per process
model = transformers.AutoModel.from_config(cfg, attn_implementation="lfi")   # or from_pretrained(...)
out = model(pixel_values, output_attentions=True)     # fused, and out.attentions are returned
with lfi.capture_attention(model, layers=[-1], rows=0) as maps:             # or just some rows
    model(pixel_values)
```

``register(name="lfi")`` registers

* ``lfi_attention_forward`` in ``transformers.AttentionInterface`` — the attention function every
  model with ``_supports_attention_backend`` routes through (ViT, CLIP, SigLIP, DINOv2, Llama, ...);
* transformers' ``sdpa_mask`` in ``AttentionMaskInterface`` under the same name. Without a mask
  function, ``masking_utils`` returns *no mask at all* for an unknown implementation and padding
  would be silently ignored. The sdpa mask is a boolean (B, 1, Q, KV) mask (True = attend), which
  is lfi's convention; it is skipped (None) exactly when SDPA would rely on ``is_causal`` instead.

A call that asks for no maps (no ``output_attentions``, no capture of the module) on backend "auto"
(``register``'s backend, the module attribute ``lfi_backend`` and ``LFI_BACKEND``) is handed to
transformers' own ``sdpa_attention_forward`` with the same arguments: the outputs are bit-identical
to the same model loaded with ``attn_implementation="sdpa"`` (transformers' default).

Otherwise the attention function follows ``sdpa_attention_forward``: ``is_causal`` from the call
(else the module's ``is_causal``) applies only when there is more than one query and no mask;
grouped-query heads are passed as they are (the op handles H % Hkv == 0 natively, no
``repeat_kv``); ``position_bias`` is folded into a float mask. The maps (in the query dtype, taken
before dropout) are computed when ``output_attentions`` is requested — then returned, as the eager
path does — or when ``lfi.capture_attention`` selects the module (only the requested rows).

``config.output_attentions = True`` is refused by transformers' own config setter for every
implementation but "eager"; pass ``output_attentions=True`` at call time instead, or opt one model
in with ``set_output_attentions(model)`` (it sets the flag on that model's configs only, bypassing
the setter; transformers' behaviour for other models and implementations is unchanged).

transformers is an optional dependency: ``pip install 'lfi[integrations]'``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

try:
    import transformers  # noqa: F401
    from transformers import AttentionInterface
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "lfi.integrations.transformers needs Hugging Face transformers (>= 4.48): "
        "pip install 'lfi[integrations]' (or pip install transformers)"
    ) from exc
try:  # transformers >= 4.53 builds masks per attention implementation
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # pragma: no cover - older versions pass 4-D float masks built by the model
    AttentionMaskInterface = sdpa_mask = None

try:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
except ImportError:  # pragma: no cover - transformers < 4.48 has no attention interface at all
    sdpa_attention_forward = None

from lfi import capture as _capture
from lfi._dispatch import env_backend
from lfi.capture import attend, capturing
from lfi.integrations._common import check_backend

__all__ = ["register", "unregister", "is_registered", "lfi_attention_forward", "attention_modules",
           "set_output_attentions"]

# registered implementation name -> default backend
_REGISTERED: dict[str, str] = {}


def _wants_attentions(kwargs) -> bool:
    """Whether the model call asked for the attention maps (output_attentions)."""
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers >= 5 records outputs with hooks; the request lives in a context variable
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _position_bias_mask(position_bias, attention_mask, is_causal, query, key):
    if attention_mask is None:
        if is_causal:
            q_len, kv_len = query.shape[2], key.shape[2]
            causal = torch.arange(q_len, device=key.device)[:, None] >= torch.arange(kv_len, device=key.device)[None, :]
            return position_bias.masked_fill(~causal, float("-inf"))
        return position_bias
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], scaling: Optional[float], dropout: float,
               is_causal: Optional[bool], position_bias: Optional[torch.Tensor], backend: str, kwargs):
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"attn_implementation='lfi' does not support `{unsupported}`; use 'eager' for this model"
            )
    if kwargs.get("cache") is not None:
        raise NotImplementedError("attn_implementation='lfi' does not support paged attention caches")
    full = _wants_attentions(kwargs)
    backend = getattr(module, "lfi_backend", None) or backend
    if (not full and backend == "auto" and env_backend() == "auto" and not capturing(module)
            and sdpa_attention_forward is not None):
        # nothing asks for maps: transformers' own sdpa path, bit for bit what attn_implementation="sdpa" runs
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:  # empty static-cache prefill: as sdpa, drop the unused keys
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    out, weights = attend(module, query, key, value, attention_mask, dropout, is_causal, scaling,
                          all_rows=full, backend=backend)
    return out.transpose(1, 2).contiguous(), (weights if full else None)


def _make_attention_forward(name: str):
    def lfi_attention_forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        scaling: Optional[float] = None,
        dropout: float = 0.0,
        is_causal: Optional[bool] = None,
        position_bias: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """transformers attention function backed by ``lfi.interaction_attention``.

        query (B, H, Q, D), key/value (B, Hkv, KV, D) -> (out (B, Q, H, D), maps (B, H, Q, KV) or None)."""
        return _attention(module, query, key, value, attention_mask, scaling, dropout, is_causal, position_bias,
                          _REGISTERED.get(name, "auto"), kwargs)

    lfi_attention_forward.__qualname__ = lfi_attention_forward.__name__ = "lfi_attention_forward"
    return lfi_attention_forward


lfi_attention_forward = _make_attention_forward("lfi")


def register(name: str = "lfi", backend: str = "auto") -> str:
    """Registers ``attn_implementation=name`` (attention function and mask function) globally.

    Args:
        name: implementation name for ``from_pretrained/from_config(..., attn_implementation=name)``
            or ``model.set_attn_implementation(name)``.
        backend: lfi backend used by modules of models with this implementation ("auto", "torch",
            "triton" or "cuda"; see ``lfi._dispatch``); a module attribute ``lfi_backend``
            overrides it per module.

    Returns:
        name. Calling it again updates the backend.
    """
    check_backend(backend)
    if not isinstance(name, str) or not name or name in ("eager", "sdpa") or name.startswith("flash"):
        raise ValueError(f"invalid attention implementation name {name!r}")
    _REGISTERED[name] = backend
    AttentionInterface.register(name, lfi_attention_forward if name == "lfi" else _make_attention_forward(name))
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(name, sdpa_mask)
    _capture._register_finder(attention_modules_of)
    return name


def unregister(name: str = "lfi") -> None:
    """Removes a name registered by ``register`` (models already using it will fail to dispatch)."""
    _REGISTERED.pop(name, None)
    AttentionInterface._global_mapping.pop(name, None)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface._global_mapping.pop(name, None)


def is_registered(name: str = "lfi") -> bool:
    return name in _REGISTERED and name in AttentionInterface._global_mapping


def _recorded_attention_classes(model: nn.Module) -> tuple[type, ...]:
    """Classes whose second output the (sub)models record as `attentions`."""
    classes = []
    for sub in model.modules():
        specs = getattr(type(sub), "_can_record_outputs", None)
        if not isinstance(specs, dict):
            continue
        spec = specs.get("attentions")
        for s in spec if isinstance(spec, (list, tuple)) else [spec]:
            target = s if isinstance(s, type) else getattr(s, "target_class", None)
            if isinstance(target, type) and target not in classes:
                classes.append(target)
    return tuple(classes)


def attention_modules_of(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a Hugging Face `model` that dispatch to an lfi implementation."""
    if not _REGISTERED:
        return []
    classes = _recorded_attention_classes(model)
    found = []
    for m in model.modules():
        impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
        if impl not in _REGISTERED:
            continue
        if (isinstance(m, classes) if classes else type(m).__name__.endswith("Attention")):
            found.append(m)
    return found


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the lfi attention layers of `model` (the list capture_attention indexes)."""
    return _capture.attention_modules(model)


def set_output_attentions(model: nn.Module, value: bool = True) -> int:
    """Sets ``output_attentions`` on the configs of `model` (the model's and its sub-models', e.g. a
    CLIP's text and vision configs), so that calls return the maps without ``output_attentions=True``.

    transformers' config setter refuses ``config.output_attentions = True`` for every implementation
    but "eager"; this writes the stored flag of these config objects directly, after checking that
    each uses an implementation registered by ``register``. Nothing else changes: other models,
    other implementations and the setter itself behave as before. A later ``config.validate()``
    (e.g. in ``save_pretrained``) refuses the flag as it refuses it for sdpa; set it back with
    ``set_output_attentions(model, False)`` before saving.

    Returns:
        the number of config objects set.
    """
    configs = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_output_attentions"):
            configs[id(cfg)] = cfg
    if not configs:
        raise ValueError(f"{type(model).__name__} has no transformers config")
    for cfg in configs.values():
        impl = getattr(cfg, "_attn_implementation", None)
        if value and impl not in _REGISTERED:
            raise ValueError(
                f"set_output_attentions: a config of {type(model).__name__} uses attn_implementation={impl!r}, not an "
                f"implementation registered by lfi ({sorted(_REGISTERED)}); use config.output_attentions for eager"
            )
    for cfg in configs.values():
        cfg._output_attentions = bool(value)
    return len(configs)
