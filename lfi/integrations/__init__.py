"""Drop-in integrations, imported lazily (each needs its own optional dependency):

* ``lfi.integrations.timm`` — ``patch(model)`` / ``unpatch(model)`` for ``timm.layers.Attention``,
  ``AttentionRope``, ``EvaAttention``, ``RelPosAttention`` and ``AttentionPoolLatent``.
* ``lfi.integrations.open_clip`` — ``patch(model)`` / ``unpatch(model)`` for open_clip towers and
  poolers.
* ``lfi.integrations.transformers`` — ``register()``: ``attn_implementation="lfi"``.

Converted modules run the original forward when a call asks for no maps (bit-identical outputs) and
under TorchScript; see ``lfi.integrations._common``.

Install the optional dependencies with ``pip install 'lfi[integrations]'``.
"""
from __future__ import annotations

from lfi._lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(__name__, {}, submodules=("timm", "open_clip", "transformers"))
