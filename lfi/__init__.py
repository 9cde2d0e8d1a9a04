"""LFI: fast, exact attention machinery for Learning from Interactions."""
__version__ = "0.1.0"

from lfi.ops import interaction_attention  # noqa: E402

__all__ = ["interaction_attention", "__version__"]
