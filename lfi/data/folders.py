"""ImageFolder helpers: transforms, checked loading, multi-domain layouts, concept lists."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["IMG_EXTENSIONS", "build_transform", "load_imagefolder", "find_domains", "read_concepts",
           "class_concepts"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _has_images(d: Path) -> bool:
    try:
        return any(f.suffix.lower() in IMG_EXTENSIONS for f in d.iterdir() if f.is_file())
    except OSError:
        return False


def _class_dirs(root: Path) -> list:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_imagefolder(root: Path) -> bool:
    dirs = _class_dirs(root)
    return bool(dirs) and all(_has_images(d) for d in dirs)


def build_transform(img_size: int, mean, std, train: bool = False, augment: str = "flip"):
    """torchvision transform: resize (shorter side) + centre crop (or random-resized crop with
    augment="crop+flip" in training), optional horizontal flip, ToTensor, Normalize(mean, std)."""
    from torchvision import transforms as T

    if augment not in ("none", "flip", "crop+flip"):
        raise ValueError(f"augment must be 'none', 'flip' or 'crop+flip', got {augment!r}")
    ops = []
    if train and augment == "crop+flip":
        ops.append(T.RandomResizedCrop(img_size, scale=(0.5, 1.0), antialias=True))
    else:
        ops += [T.Resize(img_size, antialias=True), T.CenterCrop(img_size)]
    if train and augment in ("flip", "crop+flip"):
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def load_imagefolder(path, transform=None, classes: Optional[Sequence[str]] = None):
    """A torchvision ImageFolder with clear errors for a missing/empty path or mismatched classes."""
    from torchvision.datasets import ImageFolder

    root = Path(os.fspath(path)).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(
            f"data path is not a directory: {root} (expected an ImageFolder: root/<class>/<image>)")
    if not _is_imagefolder(root):
        sub = [d.name for d in _class_dirs(root)][:5]
        raise ValueError(
            f"{root} is not an ImageFolder: expected one sub-folder per class, each holding images "
            f"({', '.join(IMG_EXTENSIONS)}); found sub-folders {sub or 'none'}. For several domains pass their "
            "parent folder to `lfi eval`.")
    ds = ImageFolder(str(root), transform=transform)
    if classes is not None and list(ds.classes) != list(classes):
        raise ValueError(f"classes of {root} ({ds.classes}) differ from the model's classes ({list(classes)})")
    return ds


def find_domains(root) -> list:
    """[(domain name, path)]: root itself when it is an ImageFolder, else each sub-folder that is one
    (PACS/VLCS layout: root/<domain>/<class>/<image>). All domains must have the same classes."""
    root = Path(os.fspath(root)).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"data path is not a directory: {root}")
    if _is_imagefolder(root):
        return [(root.name, root)]
    domains = [d for d in _class_dirs(root) if _is_imagefolder(d)]
    if not domains:
        raise ValueError(f"{root} is neither an ImageFolder (root/<class>/<image>) nor a folder of domains "
                         "(root/<domain>/<class>/<image>)")
    ref = [d.name for d in _class_dirs(domains[0])]
    for d in domains[1:]:
        names = [c.name for c in _class_dirs(d)]
        if names != ref:
            raise ValueError(f"domain {d.name!r} has classes {names}, domain {domains[0].name!r} has {ref}: "
                             "all domains need the same class folders")
    return [(d.name, d) for d in domains]


def read_concepts(spec: Optional[str]) -> Optional[list]:
    """--concepts: None, a comma-separated list, or a text file (one concept per line, optionally
    'class_name: concept phrase'). Returns the raw lines."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if p.is_file():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("#")]
    if os.sep in spec or spec.endswith(".txt"):
        raise FileNotFoundError(f"concepts file not found: {p}")
    return [c.strip() for c in spec.split(",") if c.strip()]


def class_concepts(classes: Sequence[str], entries: Optional[Sequence[str]] = None) -> list:
    """One concept phrase per class, in class order.

    entries None -> the class names ('_' -> ' '). Otherwise either one phrase per class in class order,
    or 'class_name: phrase' lines covering every class. Raises ValueError on any mismatch."""
    classes = list(classes)
    if entries is None:
        return [c.replace("_", " ") for c in classes]
    entries = list(entries)
    if all(":" in e for e in entries):
        mapping = {}
        for e in entries:
            k, v = e.split(":", 1)
            mapping[k.strip()] = v.strip()
        missing = [c for c in classes if c not in mapping]
        extra = [k for k in mapping if k not in classes]
        if missing or extra:
            raise ValueError(f"the concept list does not match the classes: missing {missing[:10]}, "
                             f"unknown {extra[:10]} (classes: {classes[:10]}{'...' if len(classes) > 10 else ''})")
        return [mapping[c] for c in classes]
    if len(entries) != len(classes):
        raise ValueError(f"the concept list has {len(entries)} entries but the data has {len(classes)} classes "
                         f"({classes[:10]}{'...' if len(classes) > 10 else ''}): give one concept per class, in class "
                         "order, or 'class_name: concept' lines")
    return entries
