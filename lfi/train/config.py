"""TrainConfig: every knob of an LFI training run.

The ``lfi train`` flags are generated from the fields (lfi/train/cli.py): a field with ``Flag``
metadata (``opt(...)`` below) is the flag ``--field-name`` in the ``Flag.group`` section of
``lfi train --help``, with that help text and those choices. Fields without one (the synthetic
task's concepts / seed / teacher blur, map_topk) are set from Python or a config.json only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

__all__ = ["TrainConfig", "DEMO_STUDENT", "demo_config", "VAL_SEED_OFFSET", "SHIFT_SEED_OFFSET", "Flag",
           "parse_kv", "parse_temperature"]

# Data seeds of the built-in synthetic task, as offsets from TrainConfig.synthetic_seed (the training
# set's seed): for one synthetic_seed, the training, validation and shifted test sets never share a seed.
VAL_SEED_OFFSET = 7919      # validation set (the trainer's val split; `lfi maps --synthetic`)
SHIFT_SEED_OFFSET = 104729  # shifted test sets (`lfi demo`'s textured / noisy, `lfi eval --data synthetic`)

# The tiny ViT of the built-in demo: 32x32 images, 4x4 patches (8x8 grid), width 48, depth 4, 3 heads.
DEMO_STUDENT = dict(patch_size=4, embed_dim=48, depth=4, num_heads=3)


# ------------------------------------------------------------------------------------------------
# flag parsers (argparse types of the fields that are not plain int / float / str)
# ------------------------------------------------------------------------------------------------
def parse_kv(s: str) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} (ints/floats/bools parsed), or a JSON object."""
    s = s.strip()
    if not s:
        return {}
    if s.startswith("{"):
        return json.loads(s)
    out = {}
    for part in s.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        v = v.strip()
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        if v in ("true", "True"):
            v = True
        elif v in ("false", "False"):
            v = False
        out[k.strip()] = v
    return out


def parse_temperature(s: str):
    """'auto' or a float (the teacher's patch-softmax temperature)."""
    if s.strip().lower() == "auto":
        return "auto"
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {s!r}") from None


# ------------------------------------------------------------------------------------------------
# field -> flag metadata
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """How a TrainConfig field appears on ``lfi train`` (``dataclasses.fields(TrainConfig)[i].metadata["flag"]``).

    group: the section of ``--help``. help, choices, type: as for ``argparse.add_argument``; type
    defaults to the field's int / float / str type, and a bool field is a store_true switch.
    if_given: the flag defaults to None and, when it is not given, the base config's value stays
    (``demo_config``'s for ``--data synthetic``, else TrainConfig's); otherwise the flag's default is
    the field's default and always applies. negate: the switch is ``--no-<field>`` and sets the field
    False.
    """

    group: str
    help: Optional[str] = None
    choices: Optional[tuple] = None
    type: Optional[Callable[[str], Any]] = None
    if_given: bool = False
    negate: bool = False

    def flag_name(self, field_name: str) -> str:
        return ("--no-" if self.negate else "--") + field_name.replace("_", "-")


def opt(default: Any = dataclasses.MISSING, group: str = "", help: Optional[str] = None, *,
        factory: Optional[Callable[[], Any]] = None, **flag: Any):
    """A TrainConfig field that is also the ``lfi train`` flag described by ``Flag(group, help, **flag)``."""
    meta = {"flag": Flag(group, help, **flag)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- data
    data: str = opt("synthetic", "data", "ImageFolder root (root/<class>/<image>) or 'synthetic' (built-in task)")
    val_data: Optional[str] = opt(None, "data", "ImageFolder root for validation")
    val_split: float = opt(0.0, "data", "hold out this fraction of --data for validation")
    img_size: int = opt(224, "data", "input size (default 224; 32 for --data synthetic)", if_given=True)
    augment: str = opt("flip", "data", "training augmentation (real data only)",
                       choices=("none", "flip", "crop+flip"))
    workers: int = opt(2, "data", "DataLoader workers (real data; the built-in task uses none)")
    synthetic_train: int = opt(2000, "data", "built-in task: training images (default 1000)", if_given=True)
    synthetic_val: int = opt(1000, "data", "built-in task: validation images (default 500)", if_given=True)
    synthetic_task: str = opt("colour", "data", "built-in task: colour (the label is the striped object's colour) or "
                              "quadrant (the first demo's task, whose teacher maps give the label away)",
                              choices=("colour", "quadrant"))
    synthetic_style: str = opt("clean", "data", "built-in task: image style (lfi.data.synthetic.STYLES)")
    synthetic_concepts: Optional[str] = None   # comma list; default: all concepts of the task
    synthetic_distractors: int = opt(3, "data", "built-in task: distractor objects per image")
    strict: bool = opt(False, "data", "stop at the first unreadable image file (default: skip it with a warning "
                       "naming the file, replaced by the next readable image, and count the skips per epoch)")
    synthetic_seed: int = 1234               # data seed (independent of the training seed)
    # ---- student
    student: str = opt("vit_small_patch16_224", "student", "timm ViT name (default vit_small_patch16_224; the demo's "
                       "tiny ViT for --data synthetic)", if_given=True)
    student_weights: Optional[str] = opt(None, "student", "local timm weights file (never downloads)")
    student_kwargs: dict = opt(factory=dict, group="student", type=parse_kv, if_given=True,
                               help="timm.create_model kwargs, e.g. patch_size=4,embed_dim=48,depth=4,num_heads=3")
    queries: int = opt(8, "student", "number of interaction queries K (default 8; 6 synthetic)", if_given=True)
    supervised_layers: str = opt("all", "student", "all | last | lastN | firstN | 3,5,7")
    read_back: str = opt("off", "student", "tokens attend the queries (default off)", choices=("off", "on", "gated"),
                         if_given=True)
    head: str = opt("cls", "student", "cls: the timm head on the pooled tokens (queries unused); cls+queries: plus a "
                    "learned weighted sum of the final queries", choices=("cls", "cls+queries"))
    pos_embed_init: Optional[str] = opt(None, "student", "re-initialise the position embeddings with 2-D sin-cos "
                                        "(from-scratch students; default for synthetic)", choices=("sincos",),
                                        if_given=True)
    # ---- teacher
    teacher: str = opt("ViT-B-16", "teacher", "open_clip model name (e.g. ViT-B-16), 'synthetic' or 'none' "
                       "(default ViT-B-16; synthetic for --data synthetic)", if_given=True)
    teacher_weights: Optional[str] = opt(None, "teacher", "local open_clip weights file")
    teacher_random: bool = opt(False, "teacher", "allow a random-weight CLIP teacher (tests only)")
    teacher_kwargs: dict = opt(factory=dict, group="teacher", type=parse_kv, if_given=True,
                               help="extra open_clip.create_model kwargs (JSON)")
    concepts: Optional[str] = opt(None, "teacher", "comma list or file, one concept per class (default: class names)")
    templates: Optional[str] = opt(None, "teacher", "'|'-separated prompt templates with {} (default: 4 photo "
                                   "prompts)")
    teacher_temperature: Union[float, str] = opt(
        "auto", "teacher", "patch-softmax temperature of the CLIP teacher: a float (0.01 = the old fixed value) or "
        "'auto' (default: per image, so that the valid maps' mean entropy is --teacher-target-entropy * "
        "log(patches))", type=parse_temperature)
    teacher_target_entropy: float = opt(0.5, "teacher", "with --teacher-temperature auto: target entropy as a "
                                        "fraction of log(patches), in (0, 1)")
    teacher_select: str = opt("topk", "teacher", "concepts that supervise an image, from the teacher's zero-shot "
                              "scores: topk (default: the --teacher-topk best), threshold (probability >= "
                              "--teacher-threshold, at least the top-1) or all (multi-label data)",
                              choices=("topk", "threshold", "all"))
    teacher_topk: int = opt(1, "teacher", "with --teacher-select topk: concepts kept per image (default 1: the top "
                            "class)")
    teacher_threshold: float = opt(0.5, "teacher", "with --teacher-select threshold: zero-shot probability a concept "
                                   "needs, in (0, 1]")
    quick_gelu: bool = opt(False, "teacher", "QuickGELU teacher (OpenAI weights)")
    synthetic_sigma: float = 1.0             # SyntheticTeacher: blur (patches), presence-score noise, confusions
    synthetic_score_noise: float = opt(0.35, "data", "built-in teacher: noise on its presence scores (0 = it knows "
                                       "what is present)")
    synthetic_confuse: float = opt(0.15, "data", "built-in teacher: fraction of its maps that are another object's "
                                   "map")
    teacher_shuffle: bool = opt(False, "loss", "control: every image is supervised with the teacher output of "
                                "another image")
    # ---- loss
    lam: float = opt(1.0, "loss", "interaction-loss weight (0 = baseline)")
    supervision: str = opt("queries", "loss", "what the teacher trains: the interaction queries (LFI, default) or, as "
                           "controls, an output-level map head or the logits (distillation of a classifier on the "
                           "teacher's output)", choices=("queries", "map_head", "logits"))
    kd_temperature: float = opt(2.0, "loss", "with --supervision logits")
    assignment: str = opt("auto", "loss", "query-to-concept assignment (default fixed; topk when concepts > queries)",
                          choices=("fixed", "topk", "hungarian"), if_given=True)
    heads: str = opt("broadcast", "loss", "each head matches the teacher map (broadcast) or the head-mean map does",
                     choices=("broadcast", "mean"))
    kl_temperature: float = opt(1.0, "loss", "the student's logits are divided by it in the KL")
    # ---- optimisation
    epochs: int = opt(30, "optimisation", "training epochs")
    batch_size: int = opt(64, "optimisation", "per process (default 64; 32 synthetic)", if_given=True)
    lr: float = opt(5e-4, "optimisation", "peak learning rate (default 5e-4; 1e-3 synthetic)", if_given=True)
    min_lr: float = opt(1e-5, "optimisation", "learning rate at the end of the cosine schedule")
    weight_decay: float = opt(0.05, "optimisation", "AdamW weight decay")
    warmup_epochs: float = opt(1.0, "optimisation", "linear warmup (default 1; 0.5 synthetic)", if_given=True)
    grad_clip: float = opt(1.0, "optimisation", "gradient-norm clipping (0 = off)")
    label_smoothing: float = opt(0.0, "optimisation", "cross-entropy label smoothing")
    amp: str = opt("auto", "optimisation", "auto: bf16 on CUDA, off on CPU", choices=("auto", "bf16", "off"))
    seed: int = opt(0, "optimisation", "training seed (the built-in task's data has its own, synthetic_seed)")
    deterministic: bool = opt(False, "optimisation", "torch.use_deterministic_algorithms (warn only)")
    device: str = opt("auto", "optimisation", "auto | cpu | cuda | cuda:N")
    threads: Optional[int] = opt(None, "optimisation", "torch CPU threads")
    max_steps_per_epoch: Optional[int] = opt(None, "optimisation", "cap on the training steps per epoch")
    # ---- output
    out: str = opt("runs/exp", "output", "run folder (checkpoint, metrics.jsonl, config.json)")
    resume: Optional[str] = opt(None, "output", "checkpoint to resume from, or 'auto' (OUT/checkpoint.safetensors)")
    overwrite: bool = opt(False, "output", "start over in an --out folder that holds a run: its config.json, "
                          "checkpoint and metrics.jsonl are removed first (without it, or --resume, such a folder is "
                          "refused)")
    save_every: int = opt(1, "output", "epochs between checkpoints (0 = no checkpoint; the last epoch is always "
                          "saved otherwise)")
    eval_every: int = opt(1, "output", "epochs between validations, and the last epoch (0 = none)")
    map_topk: float = 0.1                    # fraction of patches for the map-consistency score
    progress: bool = opt(True, "output", "no progress bar", negate=True)
    quiet: bool = opt(False, "output", "no console output (log lines, the checkpoint path)")

    @property
    def synthetic(self) -> bool:
        return self.data == "synthetic"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def demo_config(**overrides) -> TrainConfig:
    """The built-in experiment's run (`lfi demo`): tiny ViT on the synthetic colour task with the
    VLM-like SyntheticTeacher; lam = 0 gives its plain-ViT baseline."""
    cfg = TrainConfig(
        data="synthetic", synthetic_task="colour", img_size=32, student="vit_tiny_patch16_224",
        student_kwargs=dict(DEMO_STUDENT), queries=6, supervised_layers="all", read_back="off", head="cls",
        pos_embed_init="sincos", teacher="synthetic", lam=1.0, assignment="fixed", epochs=15, batch_size=32, lr=1e-3,
        min_lr=1e-5, weight_decay=0.05, warmup_epochs=0.5, workers=0, progress=False, save_every=0, device="cpu",
        synthetic_train=1000, synthetic_val=500,
    )
    return cfg.replace(**overrides)
