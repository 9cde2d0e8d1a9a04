"""Teachers: per-concept interaction maps over the student's patch grid.

* ``CLIPTeacher`` — MaskCLIP-style dense text-to-patch maps from an open_clip model (local weights).
* ``SyntheticTeacher`` — maps from ground-truth masks, for the built-in synthetic task only.
"""
from lfi._lazy import lazy_names
from lfi.teachers.base import TeacherMaps, resize_log_maps
from lfi.teachers.synthetic import SyntheticTeacher, masks_to_maps

# CLIPTeacher needs open_clip: imported on first use.
__getattr__, __dir__, _lazy_all = lazy_names(__name__, {"CLIPTeacher": "lfi.teachers.clip"})
__all__ = [*_lazy_all, "SyntheticTeacher", "TeacherMaps", "masks_to_maps", "resize_log_maps"]
