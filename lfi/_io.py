"""Output files that are never half-written or silently replaced (used by the CLIs, the trainer and
the benchmark harness)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "check_output_path"]


def atomic_write(path, write) -> Path:
    """``write(tmp)`` to a temporary file next to ``path``, then ``os.replace`` it onto ``path``: a
    failure (or a crash) during the write leaves the previous ``path`` intact and no partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path, text: str) -> Path:
    """Atomic ``Path(path).write_text(text)`` (utf-8)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def check_output_path(path, overwrite: bool = False, what: str = "output file") -> Path:
    """Validates an output file before any work: its folder must exist, and an existing file is only
    replaced with ``overwrite``. Raises IsADirectoryError / FileNotFoundError / FileExistsError (all
    OSError) naming the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {what} {path}: folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {path} exists: pass --overwrite to replace it")
    return path
