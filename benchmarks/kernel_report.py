#!/usr/bin/env python
"""Compiled-kernel report for lfi's Triton kernels, made without a GPU.

    python benchmarks/kernel_report.py [--quick | --ci] [--json PATH] [--md PATH] [--targets sm_80,sm_90]
                                       [--tutorial PATH] [--filter REGEX] [--configs all|candidates|default]
                                       [--jobs N] [--dry-run] [--from-json PATH]
    python benchmarks/kernel_report.py --sweep bf16,fp16,fp32,fp32/no_tf32 [--filter REGEX] [--tiles 'BMxBNxWxS ...']
    python benchmarks/kernel_report.py --cuda [--json PATH] [--md PATH] [--targets sm_90]

Without --quick/--ci: the full grid (full_attention_cases + kl_cases), every config, sm_80 and
sm_90 (~8,500 compilations with the 20-config launchers: hours on 2 cores; --configs candidates or
--targets sm_90 cut it). --quick: bf16/fp16, D = 64/128, sm_90, the attention op (~530). --ci: the
test's set, one config per kernel and case, plus a spill-detection probe (~125). --filter REGEX
selects on "op stage kernel case" (e.g. "fwd_kernel bf16 D64"); --from-json re-renders a saved run.
--sweep: features together (sweep_cases: every combination of causal, GQA, fused KL, mask kinds and
maps, D = 64 / 128, M = N = 197 / 1024) for the given dtypes, every candidate, and a table of the
compilations that spill; with --tiles, the given tiles instead of the lists (with --filter to pick
calls: how the lists' tiles were chosen). The float32 sweep is ~2,800 compilations, ~70 min on 2 cores.

What it measures, and how:

* Launches are taken from the shipped launchers (lfi.backends.triton.*: attention_forward /
  attention_backward, kl_forward / kl_backward, kl_qk_forward / kl_qk_backward), called on small
  CPU tensors with TRITON_INTERPRET unset. ``Autotuner.run`` and ``JITFunction.run`` are patched for
  the duration of a call, so every launch is intercepted before any driver is touched: an
  autotuned launch yields every config of the autotuner's list, ``candidate`` marking those that
  survive the autotuner's own pruning (``prune_configs_by``) for that call; a direct launch yields
  its one config. When the launchers read ``LFI_AUTOTUNE``, the cases are captured a second time
  in a child process with ``LFI_AUTOTUNE=0``: the heuristic default's config is a candidate too
  (``default`` = True). Nothing runs, so the launchers return garbage; the backward gets
  ``torch.empty`` stand-ins for the forward's outputs.
* Each launch x config x target is bound as ``JITFunction.run`` binds it (the JIT's own binder:
  pointer alignment, ints equal to 1 / divisible by 16, constexprs, num_warps, num_stages) and
  compiled with ``triton.compile`` for sm_80 / sm_90 (sm_90a). Identical compilations are done once.
* ``regs`` and ``spill_bytes`` (spill stores) come from the ptxas log, ``smem_bytes`` from the
  kernel's metadata (``fits_smem``: <= 232448 B on sm_90, <= 166912 B on sm_80), ``tensor_cores``
  from the SASS (HGMMA = wgmma, HMMA = mma.sync).
* ``sass_per_score_element``: the cubin is disassembled with the cuobjdump shipped in Triton's
  wheel; a loop is an address range closed by a branch to an earlier address (its back-edge);
  the main loops are the innermost loops whose body holds a matrix instruction (HGMMA/HMMA; for
  kernels without one, loops dominated by FFMA, else loops holding MUFU.EX2). Figure = (sum of the
  main loops' static instruction counts, NOPs excluded) x num_warps / (BLOCK_M x BLOCK_N): warp-level
  SASS instructions per score element of one iteration (for dK/dV kernels the tile is BLOCK_N keys x
  BLOCK_M queries, the same product). Every main loop the binary holds is summed, including loops
  that a given call never runs (a runtime branch between a maps and a no-maps loop, or loops over
  disjoint key blocks): ``loops`` in the JSON keeps each loop's own figure.
* ``--tutorial PATH``: Triton's python/tutorials/06-fused-attention.py (a local copy; never part of
  this repository) is imported under a fake driver, its own launches are captured the same way, its
  forward is compiled at the tiles of TUTORIAL_FWD_TILES and its backward as it launches it, and
  the figures are printed next to ours; without it the figures recorded in shared/ENVIRONMENT.md.

``--cuda``: the same evidence for the C++/CUDA extension behind backend="cuda" (csrc/cuda): each .cu
file is compiled on its own with ``nvcc -cubin -arch=sm_XX -Xptxas -v`` (the extension's flags,
no torch headers needed), registers / spills per kernel come from the ptxas log, the dynamic shared
memory of the tensor-core kernels from their tile shapes (FwdShape in attention_tc.cu), HMMA from
the SASS, and the main loops are found as above; the tensor-core forward's figure is its fast loop
(the separately compiled loop over unmasked interior tiles, the one every key tile but the
edge / diagonal ones runs), instructions x 4 warps / (64 x 64), next to the Triton kernels'
figures for bf16 D = 64 at sm_90 (TRITON_REFERENCE, from this report's Triton section).

The report's reusable pieces (capture_case, bind, compile_job, analyze_sass) are plain functions;
tests/test_compiled_kernels.py runs this file with ``--ci`` in a subprocess. LFI_AUTOTUNE is
ignored by the main capture (it sees the autotuned launchers) and set to 0 in the second one.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be defined in compiled mode
if "--_capture-default" not in sys.argv:  # the main capture sees the autotuned launchers
    os.environ.pop("LFI_AUTOTUNE", None)

import argparse  # noqa: E402
import atexit  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

TARGETS = {"sm_80": 80, "sm_90": 90}
SMEM_LIMIT = {"sm_80": 166912, "sm_90": 232448}  # 163 KB, 227 KB of opt-in shared memory per block
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MATRIX_OPS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA", "UTCOMMA")
STAGES = {
    "attention_fwd_kernel": "fwd", "attention_bwd_preprocess_kernel": "bwd_preprocess",
    "attention_bwd_dkdv_kernel": "bwd_dkdv", "attention_bwd_dq_kernel": "bwd_dq",
    "kl_fwd_kernel": "kl_fwd", "kl_bwd_kernel": "kl_bwd", "kl_qk_fwd_kernel": "kl_qk_fwd",
    "kl_qk_bwd_dq_kernel": "kl_qk_bwd_dq", "kl_qk_bwd_dk_kernel": "kl_qk_bwd_dk",
}
STAGE_ORDER = ["fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq", "kl_fwd", "kl_bwd", "kl_qk_fwd", "kl_qk_bwd_dq",
               "kl_qk_bwd_dk"]
# Reference figures of Triton's fused-attention tutorial (06-fused-attention.py), recorded in
# shared/ENVIRONMENT.md (Triton 3.8, sm_90, bf16, D = 64): used when --tutorial is not given.
RECORDED_TUTORIAL = [
    ("fwd", "128x64 w8", 0.284), ("fwd", "128x64 w4", 0.257), ("fwd", "128x128 w8", 0.228),
    ("bwd_dkdv", "32x128 w4 (BLOCK_M1 x BLOCK_N1)", 0.32), ("bwd_dq", "128x32 w4 (BLOCK_M2 x BLOCK_N2)", 0.26),
]  # (stage, tile, warp-level SASS instructions per score element)


def stage_of(kernel: str) -> str:
    """Stage name of a kernel; kernels not known yet get one derived from the name."""
    if kernel in STAGES:
        return STAGES[kernel]
    name = kernel.strip("_")
    name = name[: -len("_kernel")] if name.endswith("_kernel") else name
    return name[len("attention_"):] if name.startswith("attention_") else name


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One representative call of an op. features: causal, bool_mask (B, H, M, N), key_padding
    (bool (B, 1, 1, N)), float_mask, mask_grad (the float mask receives a gradient), gqa (H = 4,
    Hkv = 2), kl (kl_target (B, 1, M, N)), fp32_target (that target in float32), rows (maps of 4
    rows only), vit197 (M = N = 197), n200 (N = 200), n1 (N = 1), cross (M = 16, N = 197),
    tf32_off (fp32 with allow_tf32 = False), no_dout (a backward without dL/dout, as when every
    row's maps are returned);
    KL ops: dense / implicit teacher, key_mask, logits target."""
    op: str
    dtype: str
    head_dim: int | None
    maps: bool = False
    features: tuple = ()
    B: int = 2
    H: int = 4
    M: int = 1024
    N: int = 1024

    @property
    def tf32(self):
        return None if self.dtype != "fp32" else "tf32_off" not in self.features

    @property
    def label(self) -> str:
        parts = [] if self.op == "interaction_attention" else [self.op]
        parts.append(self.dtype + ("" if self.tf32 is None else ("/tf32" if self.tf32 else "/no_tf32")))
        if self.head_dim is not None:
            parts.append(f"D{self.head_dim}")
        if self.op == "interaction_attention":
            parts.append("maps" if self.maps else "nomaps")
        parts += [f for f in self.features if f != "tf32_off"]
        return " ".join(parts)


def _attention_case(dtype, d, maps=False, features=(), **kw):
    return Case("interaction_attention", dtype, d, maps, tuple(features), **kw)


FEATURES = [("causal",), ("bool_mask",), ("key_padding",), ("float_mask",), ("gqa",), ("kl",)]
FEATURES_WITH_MAPS = [("causal",), ("key_padding",), ("kl",), ("rows",), ("float_mask", "mask_grad"), ("gqa",)]


def base_cases(dtypes, dims, maps=(False, True)):
    """interaction_attention without features: dtype x D x maps; "fp32" runs with
    torch.backends.cuda.matmul.allow_tf32 = True, "fp32/no_tf32" with False (what the launcher then
    does is its own choice: CUDA-core FMA dots in the kernels of issue 10's start)."""
    return [_attention_case(dt.split("/")[0], d, m, ("tf32_off",) if dt.endswith("/no_tf32") else ())
            for dt in dtypes for d in dims for m in maps]


def feature_cases(dtype, d, with_maps=True):
    """Each feature alone without maps, and (with_maps) with maps where LFI combines them."""
    cases = [_attention_case(dtype, d, False, f) for f in FEATURES]
    return cases + ([_attention_case(dtype, d, True, f) for f in FEATURES_WITH_MAPS] if with_maps else [])


def shape_cases():
    """bf16 D = 64 at the ViT-B/16 shape (M = N = 197) and a cross-attention row block (M = 16,
    N = 197), maps off and on."""
    return [_attention_case("bf16", 64, m, (f,), M=mm, N=197)
            for f, mm in (("vit197", 197), ("cross", 16)) for m in (False, True)]


def ragged_cases():
    """Maps with M or N not a multiple of 16 (Triton compiles those calls as separate variants, whose
    registers differ): bf16 at the ViT-B/16 shape (M = N = 197; D = 64 plain, causal, GQA; D = 128)
    and fp16 D = 64 with a key-padding mask at M = 64, N = 200; and one key (N = 1, compiled as a
    constant), causal with maps in float32 without TF32, whose 128-row forward crashed ptxas."""
    return ([_attention_case("bf16", 64, True, f + ("vit197",), M=197, N=197) for f in ((), ("causal",), ("gqa",))]
            + [_attention_case("bf16", 128, True, ("vit197",), M=197, N=197),
               _attention_case("fp16", 64, True, ("key_padding", "n200"), M=64, N=200),
               _attention_case("fp32", 64, True, ("causal", "tf32_off", "n1"), M=9, N=1)])


def combination_cases():
    """Features together, where the register demand peaks (each spilled before its own list or dK/dV's
    edge-tile loop): GQA + causal with maps at the ViT shape, GQA + the fused KL with a 2-D mask at
    the ViT shape and with causal masking at D = 128 (fp16), a 2-D mask with causal masking and maps
    at D = 128; at D = 128 and the ViT shape without maps, a bool mask with causal masking (fp16) and
    the fused KL with a float mask's gradient and causal masking."""
    vit = dict(M=197, N=197)
    return [_attention_case("bf16", 64, True, ("gqa", "causal", "vit197"), **vit),
            _attention_case("bf16", 64, True, ("gqa", "kl", "bool_mask", "vit197"), **vit),
            _attention_case("fp16", 128, True, ("gqa", "kl", "causal")),
            _attention_case("bf16", 128, True, ("bool_mask", "causal")),
            _attention_case("fp16", 128, False, ("bool_mask", "causal", "vit197"), **vit),
            _attention_case("bf16", 128, False, ("kl", "float_mask", "mask_grad", "causal", "vit197"), **vit)]


def full_attention_cases():
    """The full report's interaction_attention grid (96 cases): bf16, fp16, fp32 (tf32) x D = 64 /
    128 / 80 x maps off/on; the float32 cases (fused KL, float32 KL target); float32 without TF32 with
    every feature at D = 64 and 128 (exact_fp32_cases); every feature (and feature with maps) at bf16
    D = 64 and D = 128; the features alone at fp16 D = 64; the ViT and cross-attention shapes; features
    together (combination_cases)."""
    return (base_cases(("bf16", "fp16", "fp32"), (64, 128, 80)) + float32_kl_cases() + exact_fp32_cases()
            + feature_cases("bf16", 64) + feature_cases("bf16", 128) + feature_cases("fp16", 64, with_maps=False)
            + shape_cases() + ragged_cases()[1:] + combination_cases())


def kl_cases(dtypes=("bf16", "fp16", "fp32"), dims=(64, 128)):
    """attention_kl on dense logits (no head dim; plain, and with a key mask and a logit target) and
    attention_kl_qk with a dense and an implicit teacher, per dtype and head dim (fp32: tf32)."""
    cases = []
    for dtype in dtypes:
        cases.append(Case("attention_kl", dtype, None, features=("dense",)))
        cases.append(Case("attention_kl", dtype, None, features=("dense", "key_mask", "logits")))
        for d in dims:
            cases.append(Case("attention_kl_qk", dtype, d, features=("dense",)))
            cases.append(Case("attention_kl_qk", dtype, d, features=("implicit",)))
    return cases


def float32_kl_cases():
    """The fused KL with float32: float32 q (TF32), maps off and on, and a bf16 call whose KL target
    is float32 (the usual CLIP teacher). The KL forward did not compile before with a float32 target
    (Triton's thread-locality pass)."""
    return ([_attention_case("fp32", 64, m, ("kl",)) for m in (False, True)]
            + [_attention_case("bf16", 64, True, ("kl", "fp32_target"))])


def fp32_cases():
    """float32 at D = 64: without TF32 (3xTF32 products), maps off and on, and with one feature each
    (maps with causal, GQA, a float mask's gradient; the fused KL without maps); float32_kl_cases;
    and features together (TF32: GQA + causal + a float mask's gradient with maps at the ViT shape,
    the fused KL + causal + key padding without maps, the fused KL + a bool mask + causal at the ViT
    shape; exact: the fused KL + a bool mask at the ViT shape, and with GQA and causal masking,
    whose dK/dV runs as two launches), where the lists or the one dK/dV kernel before spilled."""
    return (base_cases(("fp32/no_tf32",), (64,))
            + [_attention_case("fp32", 64, maps, f + ("tf32_off",))
               for f, maps in ((("causal",), True), (("gqa",), True), (("float_mask", "mask_grad"), True),
                               (("kl",), False))]
            + float32_kl_cases()
            + [_attention_case("fp32", 64, True, ("gqa", "causal", "float_mask", "mask_grad", "vit197"), M=197, N=197),
               _attention_case("fp32", 64, False, ("kl", "causal", "key_padding")),
               _attention_case("fp32", 64, False, ("kl", "causal", "bool_mask", "vit197"), M=197, N=197),
               _attention_case("fp32", 64, False, ("kl", "bool_mask", "vit197", "tf32_off"), M=197, N=197),
               _attention_case("fp32", 64, False, ("kl", "gqa", "causal", "bool_mask", "tf32_off"))])


def exact_fp32_cases():
    """Float32 without TF32 (the 3xTF32 kernels) at D = 64 and 128: maps off and on, each feature
    alone, and with maps where LFI uses it, and with maps at the ViT shape (M = N = 197: ragged)."""
    cases = []
    for d in (64, 128):
        cases += base_cases(("fp32/no_tf32",), (d,))
        cases += [_attention_case("fp32", d, False, f + ("tf32_off",)) for f in FEATURES]
        cases += [_attention_case("fp32", d, True, f + ("tf32_off",)) for f in FEATURES_WITH_MAPS]
        cases.append(_attention_case("fp32", d, True, ("vit197", "tf32_off"), M=197, N=197))
    return cases


SWEEP_MASKS = ((), ("bool_mask",), ("key_padding",), ("float_mask",), ("float_mask", "mask_grad"))


def sweep_cases(dtypes=("bf16", "fp16")):
    """--sweep: features together, 320 calls per dtype (bf16, fp16, fp32 = TF32, fp32/no_tf32 = exact
    float32): every combination of causal masking, GQA, the fused KL and no / bool / key-padding /
    float mask / float mask with its gradient, maps of every row off and on, D = 64 and 128, at
    M = N = 1024 and at the ViT shape (M = N = 197, where Triton compiles its own variants)."""
    cases = []
    for dtype, d, maps, vit in itertools.product(dtypes, (64, 128), (False, True), (False, True)):
        for mask, causal, gqa, kl in itertools.product(SWEEP_MASKS, (False, True), (False, True), (False, True)):
            features = (mask + ("causal",) * causal + ("gqa",) * gqa + ("kl",) * kl + ("vit197",) * vit
                        + ("tf32_off",) * dtype.endswith("/no_tf32"))
            cases.append(_attention_case(dtype.split("/")[0], d, maps, features, **(dict(M=197, N=197) if vit else {})))
    return cases


def ci_cases():
    """The CI test's grid: bf16/fp16 x D = 64/128 with maps off and on; every feature (alone, and
    with maps where LFI uses it) at bf16 D = 64 and at fp16 D = 128; the ragged shapes; features
    together (combination_cases); the float32 cases; the maps backward without dL/dout (bf16 D = 64);
    one attention_kl case and a dense and an implicit attention_kl_qk case."""
    return (base_cases(("bf16", "fp16"), (64, 128)) + feature_cases("bf16", 64) + feature_cases("fp16", 128)
            + ragged_cases() + combination_cases() + fp32_cases() + [_attention_case("bf16", 64, True, ("no_dout",))]
            + [Case("attention_kl", "bf16", None, features=("dense", "key_mask")),
               Case("attention_kl_qk", "bf16", 64, features=("dense",)),
               Case("attention_kl_qk", "fp16", 128, features=("implicit",))])


def quick_cases():
    """--quick: bf16/fp16 x D = 64/128, the attention op without features, maps off and on."""
    return base_cases(("bf16", "fp16"), (64, 128))


# ----------------------------------------------------------------------------------------------
# Capture: intercept the launchers' kernel launches
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RawLaunch:
    """One intercepted launch of one config: the JITFunction and its arguments as the JIT sees them."""
    fn: object
    args: tuple
    kwargs: dict
    candidate: bool
    source: str  # "autotune" (one entry of an autotuner's list) or "direct"
    n_configs: int


class Capture:
    """Context manager: while active, ``Autotuner.run`` and ``JITFunction.run`` record launches
    instead of compiling or running them (the launcher keeps going with its garbage outputs).
    Autotuned launches are recorded once per config of the autotuner's list, each through the
    autotuner's inner chain (e.g. triton.heuristics), so the recorded kwargs are what the JIT gets."""

    def __init__(self):
        self.launches: list[RawLaunch] = []
        self._context = None  # (candidate, n_configs) while the autotuner replays its configs

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        self._saved = (Autotuner.run, JITFunction.run)
        capture = self

        def jit_run(fn, *args, grid=None, warmup=False, **kwargs):
            candidate, n_configs, source = capture._context or (True, 1, "direct")
            args = tuple(_snapshot(a) for a in args)
            capture.launches.append(RawLaunch(fn, args, dict(kwargs), candidate, source, n_configs))
            return None

        def autotuner_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = list(tuner.configs)
            try:
                kept = tuner.prune_configs(kwargs) if len(configs) > 1 else configs
            except Exception as exc:  # a failing prune: every config is reported as a candidate
                print(f"warning: {tuner.base_fn.__name__}: config pruning failed ({exc})", file=sys.stderr)
                kept = configs
            try:
                for config in configs:
                    capture._context = (config in kept, len(configs), "autotune")
                    if config.pre_hook is not None:  # as Autotuner.run does before a launch
                        config.pre_hook({**tuner.nargs, **kwargs, **config.all_kwargs()})
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                capture._context = None
                tuner.nargs = None
            return None

        Autotuner.run, JITFunction.run = autotuner_run, jit_run
        return self

    def __exit__(self, *exc):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        Autotuner.run, JITFunction.run = self._saved
        return False


def _snapshot(arg):
    """The argument as it is at launch time: objects a pre_hook may mutate later (e.g. a tensor
    descriptor whose block_shape each config sets) are copied, with their list attributes."""
    if arg is None or isinstance(arg, (torch.Tensor, int, float, bool, str)) or callable(arg):
        return arg
    try:
        copied = copy.copy(arg)
        for name, value in vars(copied).items():
            if isinstance(value, list):
                setattr(copied, name, list(value))
        return copied
    except Exception:  # not copyable: keep the object itself
        return arg


def _run_captured(fn) -> list[RawLaunch]:
    """Runs fn() under a Capture; returns its launches. Errors after the launches (the launcher
    working on garbage) are ignored; an error before any launch is raised."""
    with Capture() as cap:
        try:
            fn()
        except Exception:
            if not cap.launches:
                raise
    return cap.launches


def _attention_calls(case: Case):
    """(fwd, bwd) thunks calling the interaction_attention launchers as the op layer does."""
    from lfi.backends.triton import interaction_attention as L
    dt, f = DTYPES[case.dtype], set(case.features)
    B, H, M, N, D = case.B, case.H, case.M, case.N, case.head_dim
    Hkv = H // 2 if "gqa" in f else H
    q = torch.empty(B, H, M, D, dtype=dt)
    k, v = torch.empty(B, Hkv, N, D, dtype=dt), torch.empty(B, Hkv, N, D, dtype=dt)
    mask = None
    if "bool_mask" in f:
        mask = torch.empty(B, H, M, N, dtype=torch.bool)
    elif "key_padding" in f:
        mask = torch.empty(B, 1, 1, N, dtype=torch.bool)
    elif "float_mask" in f:
        mask = torch.empty(B, H, M, N, dtype=dt)
    kl_target = torch.empty(B, 1, M, N, dtype=torch.float32 if "fp32_target" in f else dt) if "kl" in f else None
    causal = "causal" in f
    w_start, w_stop = ((0, 4) if "rows" in f else (0, M)) if case.maps else (0, 0)
    scale = D ** -0.5

    def fwd():
        L.attention_forward(q, k, v, mask, scale, causal, w_start, w_stop, kl_target)

    def bwd():
        out, stats = torch.empty(B, H, M, D, dtype=dt), torch.empty(B, H, M, 2, dtype=torch.float32)
        grad_out = None if "no_dout" in f else torch.empty(B, H, M, D, dtype=dt)
        grad_w = torch.empty(B, H, w_stop - w_start, N, dtype=dt) if case.maps else None
        tnorm = grad_kl = None
        if kl_target is not None:
            tnorm, grad_kl = torch.empty(B, H, M, dtype=torch.float32), torch.empty(B, H, M, dtype=torch.float32)
        L.attention_backward(grad_out, grad_w, q, k, v, out, stats, mask, scale, causal, w_start, w_stop,
                             "mask_grad" in f, kl_target, tnorm, grad_kl)

    return [("fwd", fwd), ("bwd", bwd)]


def _kl_calls(case: Case):
    """(fwd, bwd) thunks calling the attention_kl launchers (logits (B, H, M, N), target (B, 1, M, N))."""
    from lfi.backends.triton import attention_kl as L
    dt, f = DTYPES[case.dtype], set(case.features)
    B, H, M, N = case.B, case.H, case.M, case.N
    logits, target = torch.empty(B, H, M, N, dtype=dt), torch.empty(B, 1, M, N, dtype=dt)
    key_mask = torch.empty(B, 1, 1, N, dtype=torch.bool) if "key_mask" in f else None
    is_logits = "logits" in f
    stats = [torch.empty(B, H, M, 2, dtype=torch.float32) for _ in range(2)]
    grad_kl = torch.empty(B, H, M, dtype=torch.float32)
    return [("fwd", lambda: L.kl_forward(logits, target, key_mask, 1.0, 1.0, is_logits)),
            ("bwd", lambda: L.kl_backward(grad_kl, logits, target, key_mask, *stats, 1.0, 1.0, is_logits))]


def _kl_qk_calls(case: Case):
    """(fwd, bwd) thunks calling the attention_kl_qk launchers (dense target or implicit teacher)."""
    from lfi.backends.triton import attention_kl_qk as L
    dt, f = DTYPES[case.dtype], set(case.features)
    B, H, M, N, D = case.B, case.H, case.M, case.N, case.head_dim
    q, k = torch.empty(B, H, M, D, dtype=dt), torch.empty(B, H, N, D, dtype=dt)
    if "implicit" in f:
        target, q_t, k_t, is_logits = None, torch.empty(B, H, M, D, dtype=dt), torch.empty(B, H, N, D, dtype=dt), True
    else:
        target, q_t, k_t, is_logits = torch.empty(B, 1, M, N, dtype=dt), None, None, False
    key_mask = torch.empty(B, 1, 1, N, dtype=torch.bool) if "key_mask" in f else None
    stats = [torch.empty(B, H, M, 2, dtype=torch.float32) for _ in range(2)]
    grad_kl = torch.empty(B, H, M, dtype=torch.float32)
    s = D ** -0.5
    return [("fwd", lambda: L.kl_qk_forward(q, k, target, q_t, k_t, key_mask, s, s, is_logits)),
            ("bwd", lambda: L.kl_qk_backward(grad_kl, q, k, target, q_t, k_t, key_mask, *stats, s, s, is_logits))]


CALLS = {"interaction_attention": _attention_calls, "attention_kl": _kl_calls, "attention_kl_qk": _kl_qk_calls}


def capture_case(case: Case) -> list[RawLaunch]:
    """Every launch (x config) the shipped launchers make for this case, forward then backward. A
    fake sm_90 driver is active, for launchers that query the device (their choices are sm_90's)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    if case.tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = case.tf32
    try:
        with fake_driver():
            return [launch for _, thunk in CALLS[case.op](case) for launch in _run_captured(thunk)]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------
# Binding: the JIT's own specialization, as a picklable compile job
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CompileJob:
    """Everything triton.compile needs, picklable: the kernel is re-imported by module (or file)."""
    module: str
    name: str
    file: str
    target: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    block_m: int | None
    block_n: int | None
    num_warps: int
    num_stages: int
    key: str = ""
    variant: str = ""  # the key without the config (block sizes, warps, stages): one launch of a kernel


def _backend(target: str):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", TARGETS[target], 32))


def bind(launch: RawLaunch, target: str, override: dict | None = None) -> CompileJob:
    """Binds a launch as JITFunction.run does (create_function_from_signature + _pack_args) for a
    target; override replaces config kwargs (e.g. a forced tile)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature
    fn, kwargs = launch.fn, {**launch.kwargs, **(override or {})}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = _backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    opts = dict(options.__dict__)
    job = CompileJob(fn.module, fn.fn.__qualname__, fn.fn.__code__.co_filename, target, signature, constexprs,
                     attrs, opts, kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N"), opts["num_warps"],
                     opts["num_stages"])
    # The variant is the launch without its config; the key adds the config (block sizes, options).
    tiles = {(fn.arg_names.index(n),) for n in ("BLOCK_M", "BLOCK_N") if n in fn.arg_names}  # keyed by path
    variant = (job.module, job.name, target, sorted(signature.items()),
               sorted(((k, v) for k, v in constexprs.items() if k not in tiles), key=repr), sorted(attrs.items()))
    config = (sorted((k, v) for k, v in constexprs.items() if k in tiles),
              sorted((k, repr(v)) for k, v in opts.items()))
    job.variant = hashlib.sha1(repr(variant).encode()).hexdigest()[:16]
    job.key = hashlib.sha1(repr((variant, config)).encode()).hexdigest()[:16]
    return job


# ----------------------------------------------------------------------------------------------
# Compilation and SASS analysis (run in worker processes)
# ----------------------------------------------------------------------------------------------

class FakeDriver:
    """Enough of a Triton driver (an H100-like sm_90 device) for code that queries it while nothing
    is launched: importing the tutorial, a launcher that asks for the target or the device's shared
    memory, or (benchmarks/launcher_overhead.py) JITFunction.run and the autotuner."""

    def __init__(self, arch=90):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)
        props = {"max_shared_mem": SMEM_LIMIT["sm_90"], "max_num_regs": 65536, "multiprocessor_count": 132,
                 "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}
        self.utils = type("FakeUtils", (), {"get_device_properties": staticmethod(lambda device=0: dict(props))})()

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        """Constant timings: an autotuner keeps the first config of its pruned list."""
        return lambda kernel_call, quantiles=None, **kwargs: [1.0, 1.0, 1.0]


@contextlib.contextmanager
def fake_driver():
    """A fake Triton driver and torch.cuda.get_device_capability() = (9, 0) while active."""
    from triton.runtime.driver import driver
    saved, saved_cap = driver._active, torch.cuda.get_device_capability
    driver.set_active(FakeDriver())
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    try:
        yield
    finally:
        driver._active, torch.cuda.get_device_capability = saved, saved_cap


def load_module_from_path(path: str, name: str):
    """Imports a Python file (e.g. Triton's tutorial) under a fake driver; cached in sys.modules."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with fake_driver():
        spec.loader.exec_module(module)
    return module


def _resolve_kernel(job: CompileJob):
    from triton.runtime.jit import JITFunction
    if job.module.startswith("_kernel_report_ext"):
        module = load_module_from_path(job.file, job.module)
    else:
        module = importlib.import_module(job.module)
    obj = getattr(module, job.name)
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _worker_init():
    """Compile for real every time (the ptxas log is only produced then), in a private cache."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton import knobs
    knobs.compilation.always_compile = True
    knobs.cache.dir = tempfile.mkdtemp(prefix="kernel_report_cache_")
    atexit.register(shutil.rmtree, knobs.cache.dir, True)
    knobs.nvidia.dump_ptxas_log = True


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv
    return str(Path(nv.__file__).parent / "bin" / name)


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill stores / loads and stack frame bytes from a `ptxas -v` log."""
    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None
    return {"regs": grab(r"Used (\d+) registers"), "spill_bytes": grab(r"(\d+) bytes spill stores"),
            "spill_load_bytes": grab(r"(\d+) bytes spill loads"), "stack_bytes": grab(r"(\d+) bytes stack frame")}


def _cuobjdump_sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, opcode, text) of every SASS instruction of a cubin, via cuobjdump -sass."""
    return sass_instructions(_cuobjdump_sass(cubin))


def _base(opcode: str) -> str:
    return opcode.split(".")[0]


def find_loops(instructions) -> list[tuple[int, int]]:
    """(first, last) instruction index of each loop: a branch to an earlier address closes a loop
    starting there (several back-edges to one target make one loop, up to the last of them)."""
    index = {addr: i for i, (addr, _, _) in enumerate(instructions)}
    loops = {}
    for i, (addr, opcode, text) in enumerate(instructions):
        if _base(opcode) not in ("BRA", "JMP"):
            continue
        m = re.findall(r"0x([0-9a-f]+)", text)
        target = int(m[-1], 16) if m else None
        if target is not None and target < addr and target in index:
            start = index[target]
            loops[start] = max(loops.get(start, i), i)
    return sorted(loops.items())


def _loop_stats(instructions, first, last) -> dict:
    ops = [_base(op) for _, op, _ in instructions[first:last + 1] if _base(op) != "NOP"]
    full = [op for _, op, _ in instructions[first:last + 1]]
    return {"start": hex(instructions[first][0]), "end": hex(instructions[last][0]), "instructions": len(ops),
            "mma": sum(op in MATRIX_OPS for op in ops), "ex2": sum(op.startswith("MUFU.EX2") for op in full),
            "ffma": ops.count("FFMA"), "stores": ops.count("STG")}


def main_loops(instructions) -> tuple[str | None, list[dict]]:
    """(kind, loops): the innermost loops holding a matrix instruction ("mma"); failing that the
    innermost FFMA-dominated loops ("ffma": FFMA >= 25 % of the body and >= 64 of them), failing
    that the innermost loops holding MUFU.EX2 ("ex2"). Innermost = containing no other loop of
    the same kind (a small wait loop nested inside does not disqualify a main loop)."""
    loops = [(a, b, _loop_stats(instructions, a, b)) for a, b in find_loops(instructions)]
    kinds = [("mma", lambda s: s["mma"] > 0),
             ("ffma", lambda s: s["ffma"] >= 64 and 4 * s["ffma"] >= s["instructions"]),
             ("ex2", lambda s: s["ex2"] > 0)]
    for kind, test in kinds:
        chosen = [(a, b, s) for a, b, s in loops if test(s)]
        inner = [s for a, b, s in chosen
                 if not any((a2, b2) != (a, b) and a <= a2 and b2 <= b for a2, b2, _ in chosen)]
        if inner:
            return kind, inner
    return None, []


def analyze_sass(cubin: bytes, block_m, block_n, num_warps) -> dict:
    """Tensor-core use and the main loops' warp-level instructions per score element."""
    instructions = disassemble(cubin)
    opcodes = {_base(op) for _, op, _ in instructions}
    mma = "wgmma" if "HGMMA" in opcodes else ("mma" if opcodes & set(MATRIX_OPS) else None)
    kind, loops = main_loops(instructions)
    tile = block_m * block_n if block_m and block_n else None
    for loop in loops:
        loop["per_score"] = round(loop["instructions"] * num_warps / tile, 4) if tile else None
    total = sum(loop["instructions"] for loop in loops)
    return {"tensor_cores": mma is not None, "mma": mma, "sass_instructions": len(instructions),
            "loop_kind": kind, "loops": loops, "main_loop_instructions": total if loops else None,
            "sass_per_score_element": round(total * num_warps / tile, 4) if loops and tile else None}


def error_text(exc: BaseException) -> str:
    """One line: the exception type, for a Triton compilation error the kernel source line it points
    at, and the innermost message of the exception chain."""
    parts, seen = [type(exc).__name__], exc
    node, src = getattr(exc, "node", None), getattr(exc, "src", None)
    if node is not None and src and getattr(node, "lineno", None):
        parts.append(f"`{src.splitlines()[node.lineno - 1].strip()}`")
    message = None
    while seen is not None:
        msg = getattr(seen, "error_message", None) if hasattr(seen, "node") else str(seen)
        message = msg or message
        seen = seen.__cause__ or seen.__context__
    if message:
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        parts.append(lines[-1] if lines else "")
    return ": ".join(parts)[:400]


def compile_job(job: CompileJob) -> dict:
    """Compiles one job; returns regs, spills, smem and the SASS figures (numbers None on error)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    t0 = time.time()
    result = {"regs": None, "spill_bytes": None, "spill_load_bytes": None, "stack_bytes": None, "smem_bytes": None,
              "tensor_cores": None, "mma": None, "sass_instructions": None, "loop_kind": None, "loops": [],
              "main_loop_instructions": None, "sass_per_score_element": None, "dots": None, "error": None}
    try:
        fn = _resolve_kernel(job)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", TARGETS[job.target], 32), options=job.options)
        result.update(parse_ptxas_log(log.getvalue()))
        result["smem_bytes"] = compiled.metadata.shared
        result["dots"] = compiled.asm["ttir"].count("tt.dot ")
        result.update(analyze_sass(compiled.asm["cubin"], job.block_m, job.block_n, job.num_warps))
    except Exception as exc:  # a compile error is a result too
        result["error"] = error_text(exc)
    result["compile_s"] = round(time.time() - t0, 2)
    return result


def compile_all(jobs: dict, workers: int, progress=True) -> dict:
    """{key: result} for {key: job}, on a spawn process pool of `workers` (in-process when 1)."""
    results, items, t0 = {}, list(jobs.items()), time.time()
    # Longest first: fp32 and big tiles take the longest, so start them early.
    items.sort(key=lambda kv: -(kv[1].block_m or 0) * (kv[1].block_n or 0) * kv[1].options.get("num_warps", 4))
    if workers <= 1:
        _worker_init()
        mapped = ((key, compile_job(job)) for key, job in items)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
        futures = {pool.submit(compile_job, job): key for key, job in items}
        from concurrent.futures import as_completed
        mapped = ((futures[f], f.result()) for f in as_completed(futures))
    for n, (key, result) in enumerate(mapped, 1):
        results[key] = result
        if progress and (n % 25 == 0 or n == len(items)):
            print(f"  compiled {n}/{len(items)} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if workers > 1:
        pool.shutdown()
    return results


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------

def launcher_reads_autotune_env() -> bool:
    """True when the launchers mention LFI_AUTOTUNE (then the heuristic default is captured too)."""
    import lfi.backends.triton as launchers
    folder = Path(launchers.__file__).parent
    return any("LFI_AUTOTUNE" in p.read_text() for p in folder.glob("*.py"))


def _config_label(block_m, block_n, warps, stages):
    tile = f"{block_m}x{block_n} " if block_m is not None else ""  # a kernel without a tile (tf32_split)
    return f"{tile}w{warps} s{stages}"


def case_records(case: Case, launches: list[RawLaunch], targets, overrides=None) -> list[tuple[dict, CompileJob]]:
    """(record without results, job) per launch x target; a launch compiled exactly as an earlier one
    of the case (the TF32 split of Q, K, V and dO, say) is recorded once."""
    out, seen = [], set()
    for launch in launches:
        kernel = launch.fn.fn.__name__
        for target in targets:
            job = bind(launch, target, overrides)
            if job.key in seen:
                continue
            seen.add(job.key)
            rec = {"op": case.op, "stage": stage_of(kernel), "kernel": kernel, "dtype": case.dtype,
                   "head_dim": case.head_dim, "maps": case.maps, "features": list(case.features),
                   "tf32": case.tf32, "M": case.M, "N": case.N, "case": case.label,
                   "block_m": job.block_m, "block_n": job.block_n, "num_warps": job.num_warps,
                   "num_stages": job.num_stages,
                   "config": _config_label(job.block_m, job.block_n, job.num_warps, job.num_stages),
                   "target": target, "candidate": bool(launch.candidate), "default": False,
                   "source": launch.source, "configs_in_list": launch.n_configs, "compile_key": job.key,
                   "variant": job.variant}
            out.append((rec, job))
    return out


def capture_jobs(cases, targets) -> list[tuple[dict, CompileJob]]:
    out = []
    for case in cases:
        try:
            launches = capture_case(case)
        except Exception as exc:
            print(f"warning: capture failed for {case.label}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        out += case_records(case, launches, targets)
    return out


def _default_capture_main(argv):
    """Child process entry (--_capture-default IN OUT): with LFI_AUTOTUNE=0 set, capture the cases
    in IN and write the (record, job) pairs of the launches the heuristic default makes to OUT."""
    cases, targets = pickle.loads(Path(argv[0]).read_bytes())
    pairs = capture_jobs(cases, targets)
    # A launch through an autotuner that still has several configs is not a heuristic default.
    pairs = [(r, j) for r, j in pairs if r["source"] == "direct" or r["configs_in_list"] == 1]
    Path(argv[1]).write_bytes(pickle.dumps(pairs))


def default_jobs(cases, targets) -> list[tuple[dict, CompileJob]]:
    """The heuristic default's launches (LFI_AUTOTUNE=0), captured in a child process so that a
    launcher reading the variable at import time sees it too. [] when the launchers ignore it."""
    if not launcher_reads_autotune_env():
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pkl", Path(tmp) / "out.pkl"
        src.write_bytes(pickle.dumps((cases, targets)))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["LFI_AUTOTUNE"] = "0"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_capture-default", str(src), str(dst)],
                       env=env, check=True)
        return pickle.loads(dst.read_bytes())


def merge_defaults(pairs, defaults):
    """Marks the default's configs (candidate and default); adds those the autotuner list lacks."""
    index = {(r["case"], r["kernel"], r["target"], r["compile_key"]): r for r, _ in pairs}
    for rec, job in defaults:
        key = (rec["case"], rec["kernel"], rec["target"], rec["compile_key"])
        if key in index:
            index[key].update(candidate=True, default=True)
        else:
            rec.update(candidate=True, default=True, source="default")
            pairs.append((rec, job))
            index[key] = rec
    return pairs


def select_configs(pairs, mode: str):
    """all: every config; candidates: candidates only; default: per (case, kernel, target, variant:
    a launch of the kernel with its own constexprs, e.g. dK/dV's two exact-float32 parts) the
    heuristic default, else the first candidate (else the first config)."""
    if mode == "all":
        return pairs
    if mode == "candidates":
        return [(r, j) for r, j in pairs if r["candidate"]]
    groups = {}
    for rec, job in pairs:
        groups.setdefault((rec["case"], rec["kernel"], rec["target"], rec["variant"]), []).append((rec, job))
    chosen = []
    for group in groups.values():
        pick = ([p for p in group if p[0]["default"]] or [p for p in group if p[0]["candidate"]] or group)[0]
        chosen.append(pick)
    return chosen


@triton.jit
def spill_probe_kernel(A, B, C, n_iter, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = sum over n_iter of A_i B_i in float32 with input_precision="ieee" (CUDA-core FMAs, no
    tensor cores). At 256 x 128 and 4 warps the accumulator alone is 256 registers per thread, over
    the 255 a thread can have: ptxas must spill, whatever the compiler does."""
    offs_m, offs_n, offs_k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(n_iter):
        a = tl.load(A + i * BLOCK_K + offs_m[:, None] * BLOCK_K + offs_k[None, :])
        b = tl.load(B + i * BLOCK_K + offs_k[:, None] * BLOCK_N + offs_n[None, :])
        acc = tl.dot(a, b, acc, input_precision="ieee")
    tl.store(C + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc)


def probe_pairs(targets) -> list[tuple[dict, CompileJob]]:
    """The spill-detection probe: spill_probe_kernel (defined here, so it does not depend on lfi's
    kernels) launched at 256 x 128 x 16, 4 warps, captured, bound and compiled like every other
    kernel. The CI test checks that it is reported as spilling, without tensor cores, with an FFMA
    main loop. Not a candidate."""
    bm, bn, bk = 256, 128, 16
    a, b, c = torch.empty(4 * bm * bk), torch.empty(4 * bk * bn), torch.empty(bm * bn)
    launches = _run_captured(lambda: spill_probe_kernel[(1,)](a, b, c, 4, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                               num_warps=4, num_stages=2))
    case = Case("spill_probe", "fp32", bk, features=("tf32_off",), B=1, H=1, M=bm, N=bn)
    pairs = case_records(case, launches, targets)
    for rec, _ in pairs:
        rec.update(candidate=False, probe=True, source="probe", stage="probe")
    return pairs


def finish_record(rec: dict, result: dict) -> dict:
    rec = {**rec, **result}
    rec["smem_limit"] = SMEM_LIMIT[rec["target"]]
    rec["fits_smem"] = None if rec["smem_bytes"] is None else rec["smem_bytes"] <= rec["smem_limit"]
    rec.setdefault("probe", False)
    return rec


# ----------------------------------------------------------------------------------------------
# Tutorial (Triton's 06-fused-attention.py, from a local file the user supplies)
# ----------------------------------------------------------------------------------------------

class _Ctx:
    """Stand-in for torch.autograd's ctx."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


TUTORIAL_FWD_TILES = [(128, 64, 8), (128, 64, 4), (128, 128, 8)]
TUTORIAL_FWD_STAGES = (2, 3, 4)


def _tutorial_launches(module, dtype):
    """The tutorial's own launches (forward through its autotuner, backward as it launches it) for
    B = 1, H = 2, N = 1024, D = 64, causal=False, plain-pointer forward (USE_TMA=False)."""
    q, k, v = (torch.empty(1, 2, 1024, 64, dtype=dtype) for _ in range(3))
    ctx = _Ctx()

    def fwd():
        try:
            module._attention.forward(ctx, q, k, v, False, 0.125, USE_TMA=False)
        except TypeError:
            module._attention.forward(ctx, q, k, v, False, 0.125)
    with fake_driver():
        fwd_launches = _run_captured(fwd)
        ctx.saved_tensors = (q, k, v, torch.empty_like(q), torch.empty(1, 2, 1024, dtype=torch.float32))
        ctx.sm_scale, ctx.HEAD_DIM, ctx.causal = 0.125, 64, False
        bwd_launches = _run_captured(lambda: module._attention.backward(ctx, torch.empty_like(q)))
    return fwd_launches, [la for la in bwd_launches if la.fn.fn.__name__ == "_attn_bwd"]


def tutorial_jobs(path: str, target: str = "sm_90"):
    """[(label, job, extra)] per dtype tried (bf16, then fp16): the tutorial's forward forced to each
    tile of TUTORIAL_FWD_TILES at each of TUTORIAL_FWD_STAGES, and its backward _attn_bwd as it
    launches it."""
    module = load_module_from_path(path, "_kernel_report_ext_tutorial")
    out = []
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        fwd_launches, bwd_launches = _tutorial_launches(module, dtype)
        jobs = []
        for bm, bn, w in TUTORIAL_FWD_TILES:
            for stages in TUTORIAL_FWD_STAGES:
                override = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": stages}
                jobs.append((f"fwd {bm}x{bn} w{w}", bind(fwd_launches[0], target, override), {"dtype": name}))
        for launch in bwd_launches:
            kw = launch.kwargs
            label = (f"bwd: dK/dV {kw['BLOCK_M1']}x{kw['BLOCK_N1']}, dQ {kw['BLOCK_M2']}x{kw['BLOCK_N2']}, "
                     f"w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}")
            jobs.append((label, bind(launch, target), {"dtype": name, "bwd": kw}))
        out.append(jobs)
    return out


def tutorial_figures(path: str, workers: int) -> list[dict]:
    """Compiles the tutorial's kernels as Triton 3.8 does for sm_90. Forward: per tile, the best
    per-score figure over TUTORIAL_FWD_STAGES. Backward: the dK/dV and dQ main loops are told apart by
    order (dK/dV first in _attn_bwd); each is counted over its own tile (dK/dV: BLOCK_M1 x BLOCK_N1,
    dQ: BLOCK_M2 x BLOCK_N2); the unmasked loop (more MUFU.EX2) is the figure, the diagonal loop
    (BLOCK_M1 / BLK_SLICE_FACTOR rows, resp. BLOCK_N2 / BLK_SLICE_FACTOR keys) is listed too.
    bf16 is tried first; the tutorial casts P to fp16, so fp16 is used when bf16 does not compile."""
    rows = []
    for jobs in tutorial_jobs(path):
        results = compile_all({job.key: job for _, job, _ in jobs}, workers, progress=False)
        rows = []
        for label, job, extra in jobs:
            res = results[job.key]
            row = {"label": label, "dtype": extra["dtype"], "stages": job.num_stages, "regs": res["regs"],
                   "spill_bytes": res["spill_bytes"], "smem_bytes": res["smem_bytes"], "mma": res["mma"],
                   "error": res["error"], "loops": res["loops"], "per_score": res["sass_per_score_element"]}
            if "bwd" in extra and res["error"] is None:
                row.update(_split_tutorial_bwd(res["loops"], extra["bwd"], job.num_warps))
            rows.append(row)
        rows = _best_per_label(rows)
        if any(r["error"] is None for r in rows if r["label"].startswith("fwd")):
            break
    return rows


def _best_per_label(rows):
    best = {}
    for row in rows:
        cur = best.get(row["label"])
        score = row["per_score"] if row["error"] is None and row["per_score"] is not None else 1e9
        if cur is None or score < (cur["per_score"] if cur["error"] is None and cur["per_score"] is not None else 1e9):
            best[row["label"]] = row
    return list(best.values())


def _split_tutorial_bwd(loops, kw, warps) -> dict:
    slice_factor = kw.get("BLK_SLICE_FACTOR", 1)
    half = len(loops) // 2
    out = {}
    for name, group, (bm, bn), masked in (("dkdv", loops[:half], (kw["BLOCK_M1"], kw["BLOCK_N1"]),
                                          (kw["BLOCK_M1"] // slice_factor, kw["BLOCK_N1"])),
                                         ("dq", loops[half:], (kw["BLOCK_M2"], kw["BLOCK_N2"]),
                                          (kw["BLOCK_M2"], kw["BLOCK_N2"] // slice_factor))):
        if not group:
            continue
        main = max(group, key=lambda lo: lo["ex2"])
        out[f"{name}_per_score"] = round(main["instructions"] * warps / (bm * bn), 4)
        out[f"{name}_instructions"] = main["instructions"]
        diag = [lo for lo in group if lo is not main]
        if diag:
            out[f"{name}_diag_per_score"] = round(diag[0]["instructions"] * warps / (masked[0] * masked[1]), 4)
    return out


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

METHOD = ("Counting method: each kernel is compiled with `triton.compile` for the target as its launcher "
          "would launch it (the JIT's own argument binding); registers and spill stores from the ptxas "
          "log, shared memory from the kernel metadata (limit: 227 KB = 232448 B on sm_90, 163 KB = 166912 B "
          "on sm_80), tensor cores = HGMMA (wgmma) / HMMA (mma.sync) in the SASS. The cubin is disassembled "
          "with `cuobjdump -sass` (Triton's wheel); a loop is closed by a branch to an earlier address "
          "(back-edge); the main loops are the innermost loops holding HGMMA/HMMA (else FFMA-dominated, "
          "else MUFU.EX2 loops). **per score** = (sum of the main loops' static SASS instructions, NOPs "
          "excluded) x num_warps / (BLOCK_M x BLOCK_N): warp-level instructions per score element of one "
          "iteration. Every main loop in the binary is summed, including loops a given call does not run "
          "(e.g. a runtime maps/no-maps branch compiles both); the per-loop figures are in parentheses, `*` marking "
          "a loop that stores to global memory (e.g. writes maps).")


def _fmt_loops(rec) -> str:
    if rec.get("sass_per_score_element") is None:
        return "n/a"
    loops = rec.get("loops") or []
    detail = " (" + " + ".join(f"{lo['per_score']:.3f}{'*' if lo.get('stores') else ''}" for lo in loops) + ")" \
        if len(loops) > 1 else ""
    return f"{rec['sass_per_score_element']:.3f}{detail}"


def _best(recs):
    """Lowest per-score figure, preferring configs that compile, fit, do not spill and have loops."""
    compiled = [r for r in recs if r["error"] is None]
    fits = [r for r in compiled if r["fits_smem"] and r["sass_per_score_element"] is not None]
    ok = [r for r in fits if not r["spill_bytes"]] or fits or compiled
    return min(ok, key=lambda r: (r["sass_per_score_element"] if r["sass_per_score_element"] is not None
                                  else 1e9, r["regs"] or 0)) if ok else None


def summary_tables(records) -> list[str]:
    """One table per stage: per (target, case) the best candidate and the candidates' problems."""
    lines = []
    stages = sorted({r["stage"] for r in records if not r.get("probe")},
                    key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else 99, s))
    for stage in stages:
        lines += [f"### {stage}", "",
                  "| target | case | best candidate | regs | spill B | smem KB | TC | per score (loops) | "
                  "candidates (spilling / over smem) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        groups = {}
        for r in records:
            if r["stage"] == stage and not r.get("probe"):
                groups.setdefault((r["target"], r["case"]), []).append(r)
        for (target, case), recs in sorted(groups.items()):
            cands = [r for r in recs if r["candidate"]] or recs
            best = _best(cands)
            bad_spill = sum(1 for r in cands if (r["spill_bytes"] or 0) > 0)
            bad_smem = sum(1 for r in cands if r["fits_smem"] is False)
            count = f"{len(cands)} of {len(recs)} ({bad_spill} / {bad_smem})"
            if best is None:
                lines.append(f"| {target} | {case} | compile error | | | | | | {count} |")
                continue
            tc = best["mma"] or "no"
            lines.append(f"| {target} | {case} | {best['config']}{' (default)' if best['default'] else ''} | "
                         f"{best['regs']} | {best['spill_bytes']} | {best['smem_bytes'] / 1024:.0f}"
                         f"{'' if best['fits_smem'] else ' (over)'} | {tc} | {_fmt_loops(best)} | {count} |")
        lines.append("")
    return lines


def problems(records) -> list[str]:
    """Candidates that spill, exceed shared memory or (bf16/fp16 with a tl.dot) lack tensor cores;
    compile errors of any config."""
    groups = {}
    for r in records:
        if r.get("probe"):
            continue
        key_base = (r["stage"], r["kernel"], r["target"], r["config"])
        if r["error"] is not None:
            groups.setdefault(("compile error: " + r["error"][:120],) + key_base, []).append(r["case"])
            continue
        if not r["candidate"]:
            continue
        if (r["spill_bytes"] or 0) > 0:
            groups.setdefault(("spills",) + key_base, []).append(f"{r['case']} ({r['spill_bytes']} B)")
        if r["fits_smem"] is False:
            groups.setdefault(("over shared memory",) + key_base, []).append(f"{r['case']} ({r['smem_bytes']} B)")
        if r["dtype"] in ("bf16", "fp16") and r["dots"] and r["tensor_cores"] is False:
            groups.setdefault(("no tensor cores",) + key_base, []).append(r["case"])
    if not groups:
        return ["None."]
    lines = [f"{len(groups)} groups (problem, stage, kernel, target, config: cases):", ""]
    for (problem, stage, kernel, target, config), cases in sorted(groups.items()):
        shown = "; ".join(cases[:6]) + (f"; ... ({len(cases)} cases)" if len(cases) > 6 else "")
        lines.append(f"- **{problem}** — {stage} `{kernel}` {target} {config}: {shown}")
    return lines


def _ours_for_tutorial(records, stage, config=None):
    recs = [r for r in records if r["stage"] == stage and r["target"] == "sm_90" and r["dtype"] == "bf16"
            and r["head_dim"] == 64 and not r["maps"] and not r["features"] and r["op"] == "interaction_attention"
            and r["candidate"] and r["M"] == 1024]
    if config:
        recs = [r for r in recs if (r["block_m"], r["block_n"], r["num_warps"]) == config]
    return _best(recs)


def tutorial_section(records, tutorial_rows) -> list[str]:
    """Tutorial figures (measured from --tutorial, else the recorded ones) next to ours (sm_90,
    bf16, D = 64, no maps, no features, M = N = 1024 candidates), with the ratios the issue tracks."""
    measured = {}
    for row in tutorial_rows or []:
        if row["label"].startswith("fwd"):
            measured[("fwd", row["label"][4:])] = row
        elif row["error"] is None:
            for part, stage in (("dkdv", "bwd_dkdv"), ("dq", "bwd_dq")):
                if f"{part}_per_score" in row:
                    measured[(stage, part)] = row
    lines = ["| stage | tutorial tile | tutorial per score | ours, same tile | ours, best candidate |",
             "|---|---|---|---|---|"]

    def ours(stage, config=None):
        r = _ours_for_tutorial(records, stage, config)
        if r is None:
            return "n/a"
        spills = f", spills {r['spill_bytes']} B" if r["spill_bytes"] else ""
        return f"{_fmt_loops(r)} ({r['config']}{spills})"
    best = {}
    for stage, label, value in RECORDED_TUTORIAL:
        key = (stage, label.split(" (")[0]) if stage == "fwd" else (stage, "dkdv" if stage == "bwd_dkdv" else "dq")
        row = measured.get(key)
        if row is None or row["error"]:
            figure = f"{value} (recorded)" + (f"; here: error {row['error'][:90]}" if row else "")
            got = value
        else:
            got = row["per_score"] if stage == "fwd" else row[f"{key[1]}_per_score"]
            figure = f"{got:.3f} ({row['dtype']}, s{row['stages']}, regs {row['regs']}, spills {row['spill_bytes']})"
            if stage != "fwd" and row.get(f"{key[1]}_diag_per_score"):
                figure += f"; diagonal loop {row[key[1] + '_diag_per_score']:.3f}"
        best[stage] = min(best.get(stage, 1e9), got)
        tile = tuple(int(x) for x in re.findall(r"\d+", label)[:3])  # (queries, keys, warps), as ours
        lines.append(f"| {stage} | {label} | {figure} | {ours(stage, tile)} | {ours(stage)} |")
    fwd = _ours_for_tutorial(records, "fwd")
    dkdv, dq = _ours_for_tutorial(records, "bwd_dkdv"), _ours_for_tutorial(records, "bwd_dq")
    lines.append("")
    if fwd and fwd["sass_per_score_element"]:
        lines.append(f"Forward, best candidate vs the tutorial's best tile: {fwd['sass_per_score_element']:.3f} / "
                     f"{best['fwd']:.3f} = {fwd['sass_per_score_element'] / best['fwd']:.2f}x "
                     f"(issue 10 target <= 1.15x; "
                     f"ours sums every main loop of the binary: {_fmt_loops(fwd)}).")
    if dkdv and dq and dkdv["sass_per_score_element"] and dq["sass_per_score_element"]:
        ours_bwd = dkdv["sass_per_score_element"] + dq["sass_per_score_element"]
        tut_bwd = best["bwd_dkdv"] + best["bwd_dq"]
        lines.append(f"Backward dK/dV + dQ, best candidates: {dkdv['sass_per_score_element']:.3f} + "
                     f"{dq['sass_per_score_element']:.3f} = {ours_bwd:.3f} vs the tutorial's {tut_bwd:.3f} = "
                     f"{ours_bwd / tut_bwd:.2f}x (target <= 1.25x).")
    maps = [r for r in records if r["stage"] == "fwd" and r["target"] == "sm_90" and r["dtype"] == "bf16"
            and r["head_dim"] == 64 and r["maps"] and not r["features"] and r["candidate"] and r["M"] == 1024]
    mbest = _best(maps)
    if mbest and fwd and mbest["sass_per_score_element"] and fwd["sass_per_score_element"]:
        lines.append(f"Forward with maps (all rows), best candidate: {_fmt_loops(mbest)} ({mbest['config']}) = "
                     f"{mbest['sass_per_score_element'] / fwd['sass_per_score_element']:.2f}x the no-maps figure "
                     f"(target <= 1.5x).")
    return lines


def headline(records) -> list[str]:
    """Counts per target: compile errors, and candidates that spill, exceed shared memory or lack
    tensor cores (bf16/fp16 with a tl.dot); the same for the bf16/fp16 D = 64/128 attention candidates."""
    def spills(recs):
        return sum(bool(r["spill_bytes"]) for r in recs)

    def over(recs):
        return sum(r["fits_smem"] is False for r in recs)
    lines = ["| target | records | compile errors | candidates | spilling | over smem | bf16/fp16 dots w/o TC |"
             " attention bf16/fp16 D64/128 candidates: spilling / over smem |", "|---|---|---|---|---|---|---|---|"]
    for target in sorted({r["target"] for r in records}):
        recs = [r for r in records if r["target"] == target and not r.get("probe")]
        cands = [r for r in recs if r["candidate"] and r["error"] is None]
        core = [r for r in cands if r["op"] == "interaction_attention" and r["dtype"] in ("bf16", "fp16")
                and r["head_dim"] in (64, 128)]
        no_tc = sum(bool(r["dots"]) and not r["tensor_cores"] and r["dtype"] != "fp32" for r in cands)
        lines.append(f"| {target} | {len(recs)} | {sum(r['error'] is not None for r in recs)} | {len(cands)} | "
                     f"{spills(cands)} | {over(cands)} | {no_tc} | {spills(core)} / {over(core)} of {len(core)} |")
    return lines


def markdown(records, tutorial_rows, meta) -> str:
    from triton.backends.nvidia.compiler import get_ptxas_version
    ptxas = re.findall(r"release ([\d.]+)", get_ptxas_version(90))
    lines = ["# Compiled-kernel report (lfi Triton kernels)", "",
             f"Triton {triton.__version__}, ptxas {ptxas[0] if ptxas else '?'}, torch {torch.__version__}; "
             f"{meta['date']}; `{meta['command']}`; {meta['cases']} cases, {len(records)} records, "
             f"{meta['compilations']} compilations in {meta['wall_s']:.0f} s on {meta['workers']} worker(s).", "",
             METHOD, "", f"Cases: {meta['grid']}" if meta.get("grid") else "", "",
             "Best candidate = lowest per-score figure among the candidates (configs autotuning or the "
             "heuristic default can pick for that call) that compile, fit shared memory and do not spill "
             "(spilling ones only when no other candidate is left). "
             "`(default)`: the LFI_AUTOTUNE=0 heuristic's config.", "", "## Overview", ""]
    lines += headline(records) + ["", "## Summary per stage", ""]
    lines += summary_tables(records)
    lines += ["## Problems", ""] + problems(records) + [""]
    probes = [r for r in records if r.get("probe")]
    if probes:
        lines += ["Spill-detection probe (not a candidate): " + "; ".join(
            f"{r['kernel']} {r['case']} {r['config']} {r['target']}: {r['spill_bytes']} B spilled" for r in probes), ""]
    lines += ["## Triton's fused-attention tutorial vs ours (bf16, D = 64, no maps, sm_90)", "",
              ("Tutorial measured here from " + f"`{meta['tutorial']}`" + " (Triton 3.8, sm_90, D = 64, causal=False; "
               "forward per tile at its best num_stages of 2/3/4; backward as the tutorial launches it). "
               "Where a tile does not compile the recorded figure is shown.") if meta.get("tutorial") else
              "Tutorial figures recorded in shared/ENVIRONMENT.md (Triton 3.8, sm_90, bf16, D = 64), measured "
              "with the same counting method; pass `--tutorial PATH` (a local copy of Triton's "
              "python/tutorials/06-fused-attention.py) to measure them here.", ""]
    lines += tutorial_section(records, tutorial_rows) + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def forced_tile_jobs(cases, targets, tiles) -> list[tuple[dict, CompileJob]]:
    """--tiles: every tiled launch of the cases bound with each tile of `tiles` ("BMxBNxWARPSxSTAGES
    ..."), whatever the launchers' lists hold (records marked forced, not candidates)."""
    overrides = [dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), map(int, t.split("x"))))
                 for t in tiles.split()]
    out = []
    for case in cases:
        launches = [launch for launch in capture_case(case) if {"BLOCK_M", "BLOCK_N"} <= set(launch.kwargs)]
        for override in overrides:
            out += [({**rec, "candidate": False, "forced": True}, job)
                    for rec, job in case_records(case, launches, targets, override)]
    return out


def build(cases, targets, configs="all", workers=2, filter_re=None, probe=False, dry_run=False, tiles=None):
    """Captures, compiles and returns the records (and the number of unique compilations);
    dry_run: capture and bind only (records without results); tiles: forced tiles instead of the
    launchers' configs (forced_tile_jobs)."""
    if tiles:
        pairs = forced_tile_jobs(cases, targets, tiles)
    else:
        pairs = merge_defaults(capture_jobs(cases, targets), default_jobs(cases, targets))
    if filter_re:
        rx = re.compile(filter_re)
        pairs = [(r, j) for r, j in pairs if rx.search(f"{r['op']} {r['stage']} {r['kernel']} {r['case']}")]
    pairs = select_configs(pairs, "all" if tiles else configs)
    if probe:
        pairs += probe_pairs(targets)
    jobs = {job.key: job for _, job in pairs}
    print(f"{len(cases)} cases, {len(pairs)} records, {len(jobs)} unique compilations", file=sys.stderr, flush=True)
    if dry_run:
        return [rec for rec, _ in pairs], len(jobs)
    results = compile_all(jobs, workers)
    return [finish_record(rec, results[job.key]) for rec, job in pairs], len(jobs)


def spill_summary(records, meta) -> str:
    """--sweep / --tiles markdown: per stage, dtype and head dim the compilations that spilled (or
    exceed shared memory, or failed) out of all, with the byte range; then each such record (for
    --tiles every record) with its registers and main-loop SASS instructions per score element."""
    groups = {}
    for r in records:
        dtype = r["dtype"] + ("" if r["tf32"] is None else ("/tf32" if r["tf32"] else "/no_tf32"))
        groups.setdefault((r["stage"], dtype, r["head_dim"]), []).append(r)
    bad = [r for r in records if r["error"] or r["spill_bytes"] or r["fits_smem"] is False]
    lines = [f"# Spill sweep ({meta['date']})", "", f"`{meta['command']}`: {meta['cases']} calls, "
             f"{meta['compilations']} compilations, {meta['wall_s']:.0f} s on {meta['workers']} processes. "
             "One record per call x config (a compilation shared by several calls counts once per call).", "",
             "| stage | dtype | D | spilling / over smem / failed | spill bytes |", "|---|---|---|---:|---|"]
    for (stage, dtype, d), recs in sorted(groups.items(), key=str):
        worse = [r for r in recs if r in bad]
        spills = [r["spill_bytes"] for r in worse if r["spill_bytes"]]
        lines.append(f"| {stage} | {dtype} | {d} | {len(worse)} of {len(recs)} | "
                     f"{f'{min(spills)}-{max(spills)}' if spills else ''} |")
    shown = records if any(r.get("forced") for r in records) else bad
    lines += ["", "| stage | call | config | spill B | regs | smem KB | per score | error |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(shown, key=lambda r: (r["stage"], r["case"], r["config"])):
        lines.append(f"| {r['stage']} | {r['case']} | {r['config']} | {r['spill_bytes']} | {r['regs']} | "
                     f"{(r['smem_bytes'] or 0) / 1024:.0f} | {r['sass_per_score_element']} | {r['error'] or ''} |")
    return "\n".join(lines) + "\n"


def write_outputs(args, records, text: str, t0: float) -> int:
    """Writes the records (--json) and the markdown (--md, else stdout); returns the exit status."""
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    if args.md:
        Path(args.md).write_text(text)
    else:
        print(text)
    print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_capture-default"]:
        return _default_capture_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="bf16/fp16, D = 64/128, sm_90, the attention op's stages")
    p.add_argument("--ci", action="store_true", help="the CI test's set: sm_90, one config per kernel and case, "
                                                     "plus a spill-detection probe")
    p.add_argument("--exact", action="store_true", help="float32 without TF32 (3xTF32) with every feature, D = 64 "
                                                        "and 128, sm_90, candidates")
    p.add_argument("--sweep", metavar="DTYPES",
                   help="features together (sweep_cases) for these dtypes (comma list of bf16, fp16, fp32, "
                        "fp32/no_tf32), sm_90, candidates; a spill summary instead of the report's tables")
    p.add_argument("--tiles", metavar="'BMxBNxWxS ...'",
                   help="compile these tiles for every tiled launch of the selected cases (with --sweep and "
                        "--filter: forced-tile comparisons)")
    p.add_argument("--json", help="write the records to this file")
    p.add_argument("--md", help="write the markdown here (default: stdout)")
    p.add_argument("--targets", default=None, help="comma list of sm_80, sm_90 (default both; sm_90 with --quick/--ci)")
    p.add_argument("--tutorial", help="path to Triton's python/tutorials/06-fused-attention.py to compare with")
    p.add_argument("--filter", help="regex on 'op stage kernel case' selecting what is compiled")
    p.add_argument("--configs", choices=("all", "candidates", "default"), default=None,
                   help="all configs (default), candidates only, or the default/first candidate (--ci)")
    p.add_argument("--from-json", help="render the markdown of records saved by an earlier --json run")
    p.add_argument("--dry-run", action="store_true", help="capture and count the compilations only")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    p.add_argument("--cuda", action="store_true", help="report the C++/CUDA extension's kernels (csrc/cuda) instead")
    args = p.parse_args(argv)

    t0 = time.time()
    if args.cuda:
        return cuda_main(args)
    if args.from_json:
        records = json.loads(Path(args.from_json).read_text())
        meta = {"date": "from " + args.from_json, "command": "python benchmarks/kernel_report.py " + " ".join(argv),
                "cases": len({(r["op"], r["case"]) for r in records}),
                "compilations": len({r["compile_key"] for r in records}),
                "wall_s": sum({r["compile_key"]: r["compile_s"] for r in records}.values()),
                "workers": "1 (compile times summed)", "tutorial": None}
        text = markdown(records, None, meta)
        Path(args.md).write_text(text) if args.md else print(text)
        return 0
    if args.sweep:
        cases, targets, configs, grid = sweep_cases(args.sweep.split(",")), ["sm_90"], "candidates", [sweep_cases]
    elif args.ci:
        cases, targets, configs, grid = ci_cases(), ["sm_90"], "default", [ci_cases]
    elif args.quick:
        cases, targets, configs, grid = quick_cases(), ["sm_90"], "all", [quick_cases]
    elif args.exact:
        cases, targets, configs, grid = exact_fp32_cases(), ["sm_90"], "candidates", [exact_fp32_cases]
    else:
        cases, targets, configs = full_attention_cases() + kl_cases(), ["sm_80", "sm_90"], "all"
        grid = [full_attention_cases, kl_cases]
    targets = args.targets.split(",") if args.targets else targets
    configs = args.configs or configs
    records, n_jobs = build(cases, targets, configs, args.jobs, args.filter, probe=args.ci, dry_run=args.dry_run,
                            tiles=args.tiles)
    if args.dry_run:
        from collections import Counter
        stages = Counter((r["stage"], r["target"]) for r in records)
        print("\n".join(f"{s} {t}: {n} records" for (s, t), n in sorted(stages.items())))
        return 0
    tutorial_rows = tutorial_figures(args.tutorial, args.jobs) if args.tutorial else None
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "command": "python benchmarks/kernel_report.py " + " ".join(argv), "cases": len(cases),
            "compilations": n_jobs, "wall_s": time.time() - t0, "workers": args.jobs, "tutorial": args.tutorial,
            "grid": " ".join(" ".join(f.__doc__.split()) for f in grid) + f" Configs: {configs}; targets: "
                    f"{', '.join(targets)}; sizes: B = 2, H = 4, M = N = 1024 unless stated."}
    text = spill_summary(records, meta) if args.sweep or args.tiles else markdown(records, tutorial_rows, meta)
    return write_outputs(args, records, text, t0)


# ----------------------------------------------------------------------------------------------
# --cuda: the C++/CUDA extension's kernels (csrc/cuda), compiled with nvcc without a GPU
# ----------------------------------------------------------------------------------------------

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_FILES = ("cuda/attention_tc.cu", "cuda/attention.cu", "cuda/kl.cu")
# Triton kernels of lfi (this report's Triton section, bf16, D = 64, sm_90, default configs):
# warp-level SASS instructions per score element of the main loops.
TRITON_REFERENCE = {"fwd": 0.224, "bwd_dkdv": 0.331, "bwd_dq": 0.239}
# The same for attention_kl_qk (bf16, D = 64, default configs; `kernel_report.py --targets sm_90
# --configs default --filter 'kl_qk.*bf16 D64'`, 2026-12-03): a dense bf16 probability target (the
# report's "dense" case; our kernels' "dense b16" instantiation) and an implicit teacher.
TRITON_KL_QK_REFERENCE = {"dense b16": {"kl_qk_fwd": 0.984, "kl_qk_dq": 0.556, "kl_qk_dk": 0.608},
                          "implicit": {"kl_qk_fwd": 0.718, "kl_qk_dq": 0.661, "kl_qk_dk": 0.714}}
TC_TILE = (64, 64, 4)  # the tensor-core kernels: query rows, keys per tile, warps


def _nvcc() -> str:
    from lfi.backends.cuda import _ext
    home = _ext.cuda_home()
    if home is None:
        raise SystemExit("--cuda needs nvcc (set CUDA_HOME)")
    return str(Path(home) / "bin" / "nvcc")


def compile_cu(rel: str, target: str) -> tuple[bytes, str, float]:
    """(cubin, ptxas log, seconds) of one csrc/ .cu file, as the extension compiles it."""
    from lfi.backends.cuda.build_spec import NVCC_FLAGS
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        cmd = [_nvcc(), f"-arch={target}", "-cubin", "-std=c++17", "-Xptxas", "-v", f"-I{CSRC}",
               *[f for f in NVCC_FLAGS if f != "-lineinfo"], "-o", str(out), str(CSRC / rel)]
        t = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on {rel}:\n{r.stderr[-4000:]}")
        return out.read_bytes(), r.stderr + r.stdout, time.time() - t


def parse_ptxas_functions(log: str) -> dict:
    """{mangled name: {regs, spill_bytes, spill_load_bytes, stack_bytes}} from a ptxas -v log."""
    out, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
            out.setdefault(name, {})
            continue
        if name is None:
            continue
        if "spill stores" in line:
            out[name].update(parse_ptxas_log(line))
            out[name].pop("regs", None)
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[name]["regs"] = int(m.group(1))
    return out


def disassemble_functions(cubin: bytes) -> dict:
    """{mangled name: [(address, opcode, text)]} for every function of a cubin."""
    out = _cuobjdump_sass(cubin)
    funcs = {}
    for chunk in re.split(r"\n\s*Function : ", out)[1:]:
        name, body = chunk.split("\n", 1)
        funcs[name.strip()] = sass_instructions(body)
    return funcs


def sass_instructions(text: str) -> list:
    """[(address, opcode, text)] of the SASS lines of cuobjdump output (predicates stripped)."""
    ins = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
            ins.append((int(m.group(1), 16), text.split()[0] if text else "", text))
    return ins


def _demangle(names) -> dict:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return {n: n for n in names}
    r = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, r.stdout.splitlines())) if r.returncode == 0 else {n: n for n in names}


def _tc_kernel_info(pretty: str):
    """(stage, dtype, DP, variant) of a tensor-core kernel instantiation (attention_tc.cu, kl.cu), else
    None. stage: fwd / bwd_dq / bwd_dkdv / bwd_pre_maps (attention), kl_qk_fwd / kl_qk_dq / kl_qk_dk;
    variant: "dk+dv", "dk" or "dv" for attention dK/dV kernels; for kl_qk the target kind of the
    instantiation ("implicit" teacher, "dense b16" target of q's dtype, "dense f32"); else ""."""
    m = re.search(r"(?:attn_(fwd|bwd_dq|bwd_dkdv|bwd_pre_maps)|(kl_qk_(?:fwd|dq|dk)))_tc_kernel<(\w+), (\d+)"
                  r"(?:, (true|false), (true|false)|, (\w+))?>", pretty)
    if not m:
        return None
    stage = m.group(1) or m.group(2)
    variant = ""
    if stage == "bwd_dkdv":
        variant = "+".join(x for x, on in (("dk", m.group(5)), ("dv", m.group(6))) if on == "true")
    elif m.group(7):
        variant = {"void": "implicit", "float": "dense f32"}.get(m.group(7), "dense b16")
    return stage, ("bf16" if "bfloat16" in m.group(3) else "fp16"), int(m.group(4)), variant


def _tc_smem(stage: str, dp: int, variant: str = "") -> int:
    """Dynamic shared memory (bytes) of a tensor-core kernel: b16 tiles of 64 rows x (DP + 8) and
    float row values (kl.cu's qk_tc_smem, attention_tc.cu's shapes); kl_qk's implicit teacher adds
    its Q_t / K_t tiles."""
    tile, rowv = 2 * (dp + 8) * 64, 4 * 2 * 6 * 64
    if stage.startswith("kl_qk"):
        extra = 3 if variant == "implicit" else 0
        return (3 + extra) * tile if stage != "kl_qk_dk" else (3 + extra + (1 if extra else 0)) * tile + 4 * 2 * 4 * 64
    return {"fwd": 5 * tile, "bwd_pre_maps": 3 * tile}.get(stage, 6 * tile + rowv)


def annotate_cuda_record(rec: dict) -> dict:
    """Adds the tile, dynamic shared memory and fast-loop figure of a tensor-core kernel record."""
    tc = _tc_kernel_info(rec["kernel"])
    if tc is None:
        return rec
    stage, dtype, dp, variant = tc
    bm, bn, warps = TC_TILE
    rec.update(stage=stage, dtype=dtype, head_dim_padded=dp, variant=variant, smem_bytes=_tc_smem(stage, dp, variant),
               tile=f"{bm}x{bn} w{warps}")
    for loop in rec["loops"]:
        loop["per_score"] = round(loop["instructions"] * warps / (bm * bn), 4)
    # The fast loop: the shortest main loop (the unmasked interior-tile body, compiled on its own).
    fast = min(rec["loops"], key=lambda x: x["instructions"]) if rec["loops"] else None
    rec["fast_loop"] = fast
    rec["sass_per_score_element"] = fast["per_score"] if fast else None
    return rec


def cuda_records(targets) -> tuple[list[dict], dict]:
    records, timings = [], {}
    for target in targets:
        for rel in CUDA_FILES:
            cubin, log, secs = compile_cu(rel, target)
            timings[f"{rel} {target}"] = round(secs, 1)
            ptx = parse_ptxas_functions(log)
            funcs = disassemble_functions(cubin)
            pretty = _demangle(list(funcs))
            for name, ins in funcs.items():
                if not ins:
                    continue
                opcodes = {_base(op) for _, op, _ in ins}
                kind, loops = main_loops(ins)
                rec = {"file": rel, "target": target, "kernel": pretty[name], "sass_instructions": len(ins),
                       "tensor_cores": bool(opcodes & set(MATRIX_OPS)),
                       "hmma": sum(_base(op) == "HMMA" for _, op, _ in ins), "loop_kind": kind,
                       "loops": loops, **ptx.get(name, {})}
                records.append(annotate_cuda_record(rec))
    return records, timings


def _ratio(x, ref):
    return f"{x / ref:.2f}x" if x and ref else ""


def cuda_markdown(records, timings, meta) -> str:
    lines = [f"## backend=\"cuda\" kernels (csrc/cuda), compiled with nvcc ({meta['date']})", "",
             f"`{meta['command']}`"
             + ("; nvcc compile times: " + ", ".join(f"{k} {v} s" for k, v in timings.items()) if timings else "")
             + ".", ""]
    tc = [r for r in records if "fast_loop" in r]
    by = {(r["target"], r["stage"], r["dtype"], r["head_dim_padded"], r["variant"]): r for r in tc}
    lines += ["### Tensor-core kernels (attention_tc.cu, kl.cu: mma.sync m16n8k16, 64 x 64 tiles, 4 warps)", "",
              "Per kernel: registers, spills, dynamic shared memory, HMMA count, and the fast loop (the "
              "separately compiled loop over unmasked interior tiles) in warp-level SASS instructions per "
              "iteration and per score element; the other main loops (general / maps bodies) in the last column.", "",
              "| target | kernel | dtype | DP | regs | spills (B) | smem (B) | HMMA | fast loop | per score | "
              "other loops (per score) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(by):
        r = by[key]
        fast = r["fast_loop"] or {}
        others = [x for x in r["loops"] if x is not r["fast_loop"]]
        name = r["stage"] + (f" ({r['variant']})" if r["variant"] else "")
        lines.append(f"| {r['target']} | {name} | {r['dtype']} | {r['head_dim_padded']} | {r.get('regs')} | "
                     f"{r.get('spill_bytes')} | {r['smem_bytes']} | {r['hmma']} | {fast.get('instructions')} | "
                     f"{r.get('sass_per_score_element')} | " + ", ".join(str(x["per_score"]) for x in others) + " |")
    lines += ["", "### Against the Triton kernels (warp-level SASS instructions per score element, fast loops)", "",
              "| target | dtype | DP | forward | Triton fwd | ratio | dK/dV | dQ | backward | Triton bwd | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for target, dtype, dp in sorted({(k[0], k[2], k[3]) for k in by}):
        fwd = (by.get((target, "fwd", dtype, dp, "")) or {}).get("sass_per_score_element")
        dq = (by.get((target, "bwd_dq", dtype, dp, "")) or {}).get("sass_per_score_element")
        dkdv = sum((by[k].get("sass_per_score_element") or 0) for k in by
                   if k[:4] == (target, "bwd_dkdv", dtype, dp)) or None
        bwd = round(dq + dkdv, 4) if dq and dkdv else None
        ref = target == "sm_90" and dtype == "bf16" and dp == 64
        tf = TRITON_REFERENCE["fwd"] if ref else None
        tb = round(TRITON_REFERENCE["bwd_dkdv"] + TRITON_REFERENCE["bwd_dq"], 3) if ref else None
        lines.append(f"| {target} | {dtype} | {dp} | {fwd} | {tf or ''} | {_ratio(fwd, tf)} | "
                     f"{round(dkdv, 4) if dkdv else None} | {dq} | {bwd} | {tb or ''} | {_ratio(bwd, tb)} |")
    lines += ["", "### attention_kl_qk against the Triton kernels (warp-level SASS instructions per score element)", "",
              "Per target kind (kl.cu instantiates each kernel for an implicit teacher, a dense target of q's dtype "
              "and a dense float32 target): the fast loop (interior tiles, no key mask; for dense targets the "
              "shorter of the probability / logit loops, both in the per-kernel table) and the ratio to the Triton "
              "kernel of the same case (bf16, D = 64, sm_90).", "",
              "| target | dtype | DP | kind | forward | Triton | ratio | dQ | Triton | ratio | dK | Triton | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for target, dtype, dp, kind in sorted({(k[0], k[2], k[3], k[4]) for k in by if k[1].startswith("kl_qk")}):
        ref = TRITON_KL_QK_REFERENCE.get(kind, {}) if (target, dtype, dp) == ("sm_90", "bf16", 64) else {}
        cells = []
        for st in ("kl_qk_fwd", "kl_qk_dq", "kl_qk_dk"):
            x = (by.get((target, st, dtype, dp, kind)) or {}).get("sass_per_score_element")
            cells += [str(x), str(ref.get(st, "")), _ratio(x, ref.get(st))]
        lines.append(f"| {target} | {dtype} | {dp} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", "The kl_qk kernels' other loops (per-kernel table) are the CHECKED bodies of edge tiles and of calls "
              "with a key mask (bounds and the mask per element). attention_kl reads precomputed logits (no matrix "
              "product) and stays on CUDA cores.", ""]
    lines += ["### CUDA-core kernels (fp32, head dims > 128, rowsum(dO O) of the backward's pre-pass, "
              "attention_kl)", "",
              "| target | file | kernel | regs | spills (B) | tensor cores | main loops (kind: instructions) |",
              "|---|---|---|---|---|---|---|"]
    for r in records:
        m = re.search(r"(\w+_kernel)(<[^>]*>)?", r["kernel"])
        if "fast_loop" in r or not m:
            continue
        lp = ", ".join(str(x["instructions"]) for x in r["loops"])
        lines.append(f"| {r['target']} | {r['file']} | {m.group(0)} | {r.get('regs')} | {r.get('spill_bytes')} | "
                     f"{'yes' if r['tensor_cores'] else 'no'} | {r['loop_kind']}: {lp} |")
    lines += ["", "Per score = warp-level SASS instructions of the loop body x warps / (query rows x keys) of one "
              "iteration (64 x 64 x 4 warps for every tensor-core kernel; a dK/dV iteration covers 64 keys x 64 "
              "queries; at DP = 128 dK and dV are two launches, summed). Triton reference (lfi's Triton kernels, "
              f"bf16, D = 64, sm_90, this report's Triton section): fwd no-maps {TRITON_REFERENCE['fwd']}, "
              f"bwd dK/dV + dQ {TRITON_REFERENCE['bwd_dkdv']} + {TRITON_REFERENCE['bwd_dq']}.", ""]
    return "\n".join(lines)


def cuda_main(args) -> int:
    t0 = time.time()
    targets = args.targets.split(",") if args.targets else ["sm_90"]
    if args.from_json:  # re-render saved records
        records, timings = [annotate_cuda_record(r) for r in json.loads(Path(args.from_json).read_text())], {}
    else:
        records, timings = cuda_records(targets)
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "command": "python benchmarks/kernel_report.py --cuda"
                       + (f" --targets {args.targets}" if args.targets else "")}
    return write_outputs(args, records, cuda_markdown(records, timings, meta), t0)


if __name__ == "__main__":
    sys.exit(main())
