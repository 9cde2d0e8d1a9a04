"""Teachers: per-concept interaction maps over the student's patch grid.

* ``CLIPTeacher`` — MaskCLIP-style dense text-to-patch maps from an open_clip model (local weights).
* ``SyntheticTeacher`` — maps from ground-truth masks, for the built-in synthetic task only.
"""
from lfi.teachers.base import TeacherMaps, resize_log_maps
from lfi.teachers.synthetic import SyntheticTeacher, masks_to_maps


def __getattr__(name):
    if name == "CLIPTeacher":
        from lfi.teachers.clip import CLIPTeacher

        return CLIPTeacher
    raise AttributeError(f"module 'lfi.teachers' has no attribute {name!r}")


__all__ = ["CLIPTeacher", "SyntheticTeacher", "TeacherMaps", "masks_to_maps", "resize_log_maps"]
