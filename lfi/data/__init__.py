"""Data: the built-in synthetic task and ImageFolder helpers."""
from lfi.data.synthetic import QUADRANTS, SHAPES, STYLES, SyntheticShapes

__all__ = ["SyntheticShapes", "SHAPES", "QUADRANTS", "STYLES"]
