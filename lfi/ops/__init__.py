"""Public functional ops."""
from lfi.ops.interaction_attention import interaction_attention

__all__ = ["interaction_attention"]
