"""Result files of ``lfi bench --json``: checked before the run, written atomically after it (lfi._io)."""
from __future__ import annotations

import json
from pathlib import Path

from lfi._io import atomic_write_text, check_output_path

__all__ = ["check_output_file", "write_json_atomic"]


def check_output_file(path, overwrite: bool = False) -> Path:
    """Fails before any work (ValueError naming the path) when ``path`` cannot be written: its folder
    is missing, it is a folder, or it exists and ``overwrite`` is not set."""
    try:
        return check_output_path(path, overwrite, "--json")
    except OSError as e:
        raise ValueError(str(e)) from None


def write_json_atomic(path, payload, **dump_kw) -> Path:
    """json.dumps(payload) written atomically onto ``path``: a failure leaves the old file."""
    return atomic_write_text(Path(path).expanduser(), json.dumps(payload, **dump_kw))
