"""Student models: timm ViTs with persistent interaction queries."""
from lfi.models.interaction_vit import InteractionViT, resolve_layers

__all__ = ["InteractionViT", "resolve_layers"]
