"""ImageFolder helpers: transforms, checked loading, multi-domain layouts, concept lists."""
from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["IMG_EXTENSIONS", "build_transform", "imagefolder_classes", "load_imagefolder", "skipped_images",
           "reset_skipped", "find_domains", "read_concepts", "class_concepts"]

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


def __getattr__(name: str):
    if name == "CheckedImageFolder":  # built on first use (torchvision is imported lazily); picklable by name
        return _checked_imagefolder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _checked_imagefolder_class():
    if "CheckedImageFolder" in globals():
        return globals()["CheckedImageFolder"]
    from torchvision.datasets import ImageFolder

    class CheckedImageFolder(ImageFolder):
        """ImageFolder that names unreadable files (truncated / corrupt / not an image).

        strict: raise ValueError naming the file. Otherwise the file is skipped: a warning names it
        (once per process) and the sample is replaced by the next readable one in index order
        (deterministic); ``skipped`` counts the skips across DataLoader workers (reset it per epoch)."""

        def __init__(self, *args, strict: bool = False, **kw):
            super().__init__(*args, **kw)
            self.strict = strict
            self.skipped = multiprocessing.get_context().Value("i", 0)
            self._warned: set = set()

        def _bad(self, index: int, e: BaseException) -> None:
            path = self.samples[index][0]
            msg = f"{path}: unreadable image ({type(e).__name__}: {e})"
            if self.strict:
                raise ValueError(msg + "; remove or fix it (or train without --strict to skip it)") from None
            with self.skipped.get_lock():
                self.skipped.value += 1
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipping {msg}", RuntimeWarning, stacklevel=3)

        def __getitem__(self, index: int):
            for k in range(len(self.samples)):
                i = (index + k) % len(self.samples)
                try:
                    return super().__getitem__(i)
                except (OSError, SyntaxError) as e:  # PIL: truncated / corrupt (UnidentifiedImageError is OSError)
                    self._bad(i, e)
            raise ValueError(f"{self.root}: no readable image")

        def __getstate__(self):
            state = dict(self.__dict__)
            state["_warned"] = set()
            return state

    CheckedImageFolder.__module__ = __name__
    CheckedImageFolder.__qualname__ = "CheckedImageFolder"
    globals()["CheckedImageFolder"] = CheckedImageFolder
    return CheckedImageFolder


def skipped_images(dataset) -> int:
    """The skip counter of a load_imagefolder dataset (through Subset wrappers); 0 for other datasets."""
    while hasattr(dataset, "dataset") and not hasattr(dataset, "skipped"):
        dataset = dataset.dataset
    counter = getattr(dataset, "skipped", None)
    return 0 if counter is None else int(counter.value)


def reset_skipped(dataset) -> None:
    while hasattr(dataset, "dataset") and not hasattr(dataset, "skipped"):
        dataset = dataset.dataset
    counter = getattr(dataset, "skipped", None)
    if counter is not None:
        with counter.get_lock():
            counter.value = 0


def _imagefolder_root(path) -> Path:
    """`path` as a Path, after checking that it is an ImageFolder (root/<class>/<image>)."""
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
    return root


def imagefolder_classes(path) -> list:
    """The classes torchvision's ImageFolder will find under `path`, without listing any image."""
    from torchvision.datasets.folder import find_classes

    return list(find_classes(str(_imagefolder_root(path)))[0])


def load_imagefolder(path, transform=None, classes: Optional[Sequence[str]] = None, strict: bool = False):
    """A torchvision ImageFolder with clear errors for a missing/empty path or mismatched classes, and
    unreadable image files named (skipped with a warning, or a ValueError with ``strict``)."""
    root = _imagefolder_root(path)
    ds = _checked_imagefolder_class()(str(root), transform=transform, strict=strict)
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
