"""Public functional ops."""
from lfi.ops.attention_kl import attention_kl
from lfi.ops.attention_kl_qk import attention_kl_qk
from lfi.ops.interaction_attention import interaction_attention

__all__ = ["attention_kl", "attention_kl_qk", "interaction_attention"]
