"""LFI training layer: config, trainer (AdamW + warmup/cosine, AMP, DDP, resume), demo, CLI.

    from lfi.train import TrainConfig, Trainer, run_training, run_demo
    result = run_training(TrainConfig(data="path/to/imagefolder", teacher="ViT-B-16",
                                      teacher_weights="clip.safetensors", out="runs/exp1"))

Command line: ``lfi demo | train | eval | maps`` (see lfi.train.cli), or ``python -m lfi.train``
(also under ``torchrun --nproc_per_node=N -m lfi.train --data ...``).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "TrainConfig": "lfi.train.config",
    "demo_config": "lfi.train.config",
    "Trainer": "lfi.train.trainer",
    "run_training": "lfi.train.trainer",
    "run_demo": "lfi.train.demo",
    "evaluate": "lfi.train.evaluate",
    "save_checkpoint": "lfi.train.checkpoint",
    "load_checkpoint": "lfi.train.checkpoint",
    "load_student": "lfi.train.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lfi.train' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
