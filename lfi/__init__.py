"""LFI: fast, exact attention machinery for Learning from Interactions."""
from lfi._lazy import lazy_names
from lfi._version import __version__
from lfi.ops import interaction_attention

# capture, integrations and nn load on first use, so that `import lfi` imports no timm / open_clip / transformers.
__getattr__, __dir__, _lazy_all = lazy_names(__name__, {"capture_attention": "lfi.capture"},
                                             submodules=("capture", "integrations", "nn"))
__all__ = ["interaction_attention", "__version__", *_lazy_all]
