"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar.

``<name>.safetensors`` holds ``model.<param>`` (the student's state dict; the teacher is never
saved), ``optim.<param index>.<state name>`` (AdamW moments, step counters) and ``rng.*`` (torch
CPU / CUDA generator states). ``<name>.json`` holds the format tag, the TrainConfig, the student
spec (to rebuild it), classes, concepts, epoch, global step, the optimizer's param groups and
non-tensor state, the numpy / python RNG states and the metrics history. Both files are written
to temporary names and renamed, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lfi._io import atomic_write, atomic_write_text, check_output_path  # re-exported for the training layer

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "sidecar_path", "capture_rng", "restore_rng", "atomic_write",
           "atomic_write_text", "check_output_path"]

FORMAT = "lfi-checkpoint-v1"


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def capture_rng() -> tuple:
    """-> (tensors, json-able dict) of all RNG states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if meta.get("python"):
        v, state, gauss = meta["python"]
        random.setstate((v, tuple(state), gauss))
    if meta.get("numpy"):
        name, keys, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], meta: dict) -> Path:
    """Writes path (.safetensors) and its .json sidecar; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = dict(meta)
    meta["format"] = FORMAT
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalar = {}
        for pid, st in sd["state"].items():
            for name, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"optim.{pid}.{name}"] = val.detach().cpu().contiguous().clone()
                else:
                    scalar.setdefault(str(pid), {})[name] = val
        meta["optimizer"] = {"param_groups": sd["param_groups"], "scalar_state": scalar}
    rng_t, rng_m = capture_rng()
    tensors.update({k: v.cpu().contiguous() for k, v in rng_t.items()})
    meta["rng"] = rng_m
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    atomic_write_text(sidecar_path(path), json.dumps(meta, indent=1, default=str))
    return path


def load_checkpoint(path, map_location="cpu") -> tuple:
    """-> (tensors dict, meta dict). Clear errors for a missing file / sidecar or a foreign format."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(f"checkpoint sidecar not found: {side} (written next to the .safetensors file)")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{side}: not a valid lfi checkpoint (unreadable JSON sidecar: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{side} is not an lfi checkpoint (format {fmt!r}, expected {FORMAT!r})")
    try:
        tensors = load_file(str(path), device=str(map_location))
    except Exception as e:  # safetensors' SafetensorError (truncated / corrupt file), OSError
        raise ValueError(f"{path}: not a valid lfi checkpoint ({type(e).__name__}: {e})") from None
    return tensors, meta


def model_state(tensors: dict) -> dict:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def optimizer_state(tensors: dict, meta: dict) -> dict:
    """Rebuilds an optimizer.state_dict() from the checkpoint."""
    opt = meta["optimizer"]
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in opt.get("scalar_state", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": opt["param_groups"]}


def load_student(path, map_location="cpu"):
    """Rebuilds the InteractionViT of a checkpoint (no weights download) -> (student, meta)."""
    from lfi.models import InteractionViT

    tensors, meta = load_checkpoint(path, map_location)
    spec = dict(meta["student_spec"])
    kwargs = dict(spec.pop("timm_kwargs", {}) or {})
    student = InteractionViT(spec["model"], num_queries=spec["num_queries"],
                             supervised_layers=spec["supervised_layers"], num_classes=spec.get("num_classes"),
                             img_size=spec.get("img_size"), pretrained=False,
                             read_back=spec.get("read_back", "off"), head=spec.get("head", "cls"),
                             pos_embed_init=spec.get("pos_embed_init"), **kwargs)
    try:
        student.load_state_dict(model_state(tensors))
    except RuntimeError as e:
        raise ValueError(f"{path}: not a valid lfi checkpoint (its tensors do not fit its student: "
                         f"{str(e).splitlines()[0]})") from None
    return student.eval(), meta
