"""Launchers for the Triton attention kernels (lfi.kernels.interaction_attention).

Same contract as lfi.backends.torch.interaction_attention: q (B, H, M, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv),
mask 4-D broadcastable to (B, H, M, N) or None; float16/bfloat16/float32. The returned maps are a
view of a buffer whose rows are padded to a multiple of 16 elements (so the kernels' map stores
vectorize); every other output is contiguous.

Block configurations (see lfi.backends.triton._launch for how they are chosen): each kernel has a
short list; `_prune` keeps the ones that suit the call (tensor-core tiles for 16-bit inputs and TF32,
small CUDA-core tiles for exact float32, smaller key blocks for large head dims, no 128-row blocks
for 64 rows or fewer, estimated shared memory within the device's limit) and `_default_*` picks one
without tuning (LFI_AUTOTUNE=0). The lists and defaults come from the compiled-kernel report
(benchmarks/kernel_report.py): no candidate spills registers or exceeds shared memory.
"""
from __future__ import annotations

import math
import os
from functools import partial

import torch

from lfi.backends.triton._launch import (
    SMEM_LIMIT_SM90,
    TunedKernel,
    _block,
    _broadcast_strides,
    _precision,
    _strides,
    bucket,
    cdiv,
    configs_from,
    smem_limit,
)
from lfi.kernels import INTERPRET
from lfi.kernels import interaction_attention as K

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = math.log2(math.e)
# Map rows are allocated with a row stride that is a multiple of this many elements.
MAP_ROW_ALIGN = 16
# Exact float32 (_operands): elements per program of the TF32 split, and the alignment of each part.
SPLIT_BLOCK = 1024
SPLIT_ALIGN = 16

_FEATURES = ["M_BUCKET", "N_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "HAS_MASK", "MASK_BOOL", "KEY_MASK",
             "PRECISION"]


# Candidate configs per (kernel, head-dim class, dtype class, maps, feature class), best first: the
# first is the LFI_AUTOTUNE=0 default. Chosen from the compiled-kernel report
# (benchmarks/kernel_report.py, sm_90): none of the 16-bit configs at head dims <= 128 spills
# registers, all use wgmma, and the order follows the SASS instructions per score element.
# Head-dim class: the larger of the q/k and v head-dim blocks (64: <= 64, 128, 256). dtype class:
# "16" (float16/bfloat16), "tf32" and "3xtf32" (float32, see _launch._precision). maps: the forward
# writes maps, the backward receives their gradient (None: either). Feature class: the feature that
# needs the most registers ("kl": fused KL, at every size, with or without map gradients; "kl_gqa":
# the fused KL in a dK/dV with several query heads per kv head (with masks the KL's own 32-row tiles
# spilled 4-292 B there; at D = 128 16x32 w8 s1 is the one tile found without spills with masks,
# causal masking and map gradients at M = N = 197, 16x64 w8 / 16x128 / 32x32 / 16x32 w4 spilling
# 4-100 B; the plain KL's D = 128 list is 16x128 w8 s1 and 16x64 w8 s1, its 32x128 tiles spilling
# 4-144 B with a mask or causal masking;
# "kl_ragged": the fused KL with map gradients at M or N not a multiple of 16, where 16x128 spilled
# 4-20 B with masks at D = 128 and 32x64 w4 s2 4 B at D = 64);
# "mask": a 2-D mask tile or a mask gradient; "gqa": several query heads per kv head in dK/dV, also
# with a 2-D mask (the plain D = 128 list spilled 8-76 B there); "dw": a dK/dV with map gradients
# and none of the others (at D = 128 without the plain list's unpipelined 32x128 tile, which spilled
# 4 B with a key-padding mask and causal masking, 4-24 B with a 2-D mask); "mask_dw": map gradients with a 2-D mask
# (D = 128: 16x128 w8 s2, 230 registers; 32x128 w8 s2 holds 255 and spilled 12 B with an fp16 bool
# mask and causal masking, 32x64 w4 24-36 B; D = 64: the plain list); "ragged": a maps forward whose N is not a
# multiple of 16 (Triton compiles such calls apart, integer arguments being specialized on
# divisibility by 16, and there the pipelined 128x128 tile spills 24 B: N = 197, 577, 1000
# measured), or a dK/dV with map gradients and M or N not a multiple of 16, or with several query
# heads per kv head (its 64-row tiles spill 12-120 B there; 32x64 first: with a dW read in place
# (_copy_map_gradient) 32x128 takes 0.918 instructions per score, 32x64 0.656, and with padded rows
# 0.637 and 0.656; 32x128 unpipelined: pipelined it spilled 4 B with GQA + KL); "ragged_light": such
# a dK/dV with neither grouped heads nor a 2-D mask, where 64x64 w4 s1 does not spill (0.530 per
# score at M = N = 197, plain or causal; with those features it spills 8-324 B); "mask_ragged": a
# forward without maps with a 2-D mask at N not a multiple of 16 (D = 128: 128x64 / 64x64 spilled
# 0.5-1.4 KB, 64x32 / 128x32 0-4 B; 16-key tiles, as the fused KL's D = 128 forward, whose 64-key
# tiles spilled 4 B - 7 KB with masks, causal masking or ragged N); "kl_mask": the fused KL with a
# 2-D mask (or its gradient) in the forward or dQ (float32 forward: the plain KL's lists; 16-bit
# D = 64 forward: 128x64, 128x32 and 64x32 spilled 4-92 B at N = 197 with causal masking, 64x64 at 8
# warps holds 174-234 registers; dQ 64x64 / 128x64 8-72 B, 64x32 w4 4-56 B with map gradients; at
# D = 128 the 16-key tiles of the KL); "": none of those). The plain KL forward at D = 64: 128x64 w8
# s2 (s3 spilled 8 B with a key-padding mask and causal masking). dQ at D = 128: the fused KL's and
# the 2-D mask's 128x64 / 128x32 tiles spilled 8-736 B and 8 B, the mask's 64x32 w4 s2 8 B; the D = 64
# mask list's pipelined 128x64 w8 16 B with a float mask's gradient and causal masking.
# The 16-bit lists of every kernel were compiled for every combination of causal masking, GQA, the
# fused KL, a key-padding / bool / float mask (with its gradient) and maps of every row (off / on) at
# D = 64 and 128, M = N = 197 and 1024 (RESULTS.md, 2026-12-05): no candidate spills.
# dK/dV tiles are BLOCK_M queries x BLOCK_N keys. Float32 without TF32 on sm_90 ("3xtf32": split
# operands, both parts of the resident tiles in shared memory, see the kernels): at D <= 64 no
# candidate spills, with or without maps, for every feature ("heavy": a dK/dV with causal, GQA, the
# fused KL, a 2-D mask or a mask with map gradients, whose 32-row tile spills 4-352 B and, with maps
# and causal or GQA, the pipelined 16-row one 32-204 B; the fused KL's forward spills 20-240 B at
# 128-row tiles; the heavy 16x128 w8 s1 itself spilled 4-112 B with the fused KL or a 2-D mask and
# causal masking or GQA, where dV and dK now run as two launches, see dkdv_parts). At D = 128 the
# lists hold the tiles that fit the shared memory with the fewest spills: none in the forward
# without maps, 44 B in dQ with a float mask or the fused KL, 36-432 B with maps, and 700-1920 B in
# dK/dV, at every tile measured (RESULTS.md, 2026-12-04). TF32 with
# the fused KL: 128x64 and 64x64 forward tiles spill 16-88 B without maps, the dQ 64x64 w4 tile 108 B.
# Float32 forward lists from the same combination sweep (TF32 and exact, D = 64 and 128, M = N = 197
# and 1024; RESULTS.md, "Float32 feature combinations"): TF32 maps at D = 64 unpipelined 128x64
# (s3 spilled 16-48 B with causal masking), a 2-D mask with maps 128x32 (128x64 20-48 B); a 2-D
# mask without maps 64x64 w4 s1 as the small tile (s2 4-32 B); the fused KL without maps 64x16 only
# (128x32 w8 s2 4-272 B, s1 4-12 B, 64x64 w4 16-264 B with masks at N = 197); at D = 128 a 2-D mask
# with maps or at N not a multiple of 16, and the fused KL, 128x16 w8 (128x32 8-796 B, 64x16 w4
# 4-140 B); exact float32 maps at D = 64 unpipelined 128x64 (12-16 B pipelined with causal
# masking), 128x32 at N not a multiple of 16, a 2-D mask without maps at such N 128x16 (128x32 4-64
# B); exact float32 at D = 128 with maps 128x16 w8 (4-24 B; 64x16 w4 60-316 B: no tile without).
# TF32 dQ at D = 64 with a 2-D mask, its gradient or the fused KL: 128x32 w8, 64x32 w4 (64x64 w4
# spilled 28-192 B, 128x64 w8 4-276 B); the fused KL with a 2-D mask ("kl_mask") and no map gradient
# 128x16 w8 s2, 64x16 w4 s2 (128x32 w8 s2 8-80 B and 64x32 w4 76-176 B at N = 197; 1.07-1.17x the
# instructions per score of 128x32 s2 there), with a map gradient the KL's (none spills there).
# Exact float32 dQ at D = 64 with the fused KL and a 2-D mask (or its gradient), and with such a
# mask and no map gradient, 128x16 w8 s2 (128x32 w8 s2 spilled 4-308 B with the KL, 4-28 B with
# causal masking without; 64x16 w4 s2 held the mask alone, 88-104 B with the KL; 1.3-1.4x the
# instructions per score of 128x32). Exact float32 preprocess at D = 128 with map gradients 64x32 w4
# s2 (64x64 w4 s2 spilled 16-52 B with a 2-D mask). TF32 dQ at D = 128 with the fused KL and a 2-D
# mask (or its gradient), and without a map gradient with the KL or such a mask: 128x16 w8 s2 (the
# generic 128x32 w8 s2 spilled 4-312 B, 64x16 w4 s2 8-56 B; 1.2-1.4x the instructions per score).
# TF32 dK/dV at D = 64: the fused KL (also with map gradients at ragged sizes) 16x128 w8 s1, 16x64 w4
# s1 (32x128 w8 s2 12-88 B, 32x64 w4 12-228 B), with grouped heads the 16-bit kl_gqa list (32-row
# tiles 48-792 B; 16-row ones still 8-64 B with a mask), grouped heads 32x128 w8 s2 first (0 B
# without map gradients), with map gradients ("ragged") 16x128 w8 s1, 16x64 w4 s1 (32x128 12-136 B),
# map gradients with a 2-D mask 32x128 w8 s2, s1 (32x64 w4 8-36 B). At D = 128 the TF32 dK/dV tiles
# smaller than 16x128 w8 spill more, except 16x32 with grouped heads at 1.8-3.2x the instructions
# per score: the list stays.
# TF32 dK/dV at D = 128 (M = N = 197): 16x128 w8 tiles, half the instructions per score of the generic
# 32x64 w8 (1.17-1.91 vs 2.58-4.29) and no spills without maps (32x64: 244 B with causal); with maps
# 16-72 B (causal, KL, GQA; 32x64: 16-328 B).
# A data table, one row per key: rows alike by design (not code to fold into a function).
_TABLE = {
    ("fwd", 64, "16", False, ""): configs_from("128x128x8x2 128x64x8x3 64x64x4x2"),
    ("fwd", 64, "16", True, ""): configs_from("128x128x8x2 128x64x8x3 64x64x4x2"),
    ("fwd", 64, "16", True, "ragged"): configs_from("128x128x8x1 128x64x8x3 64x64x4x2"),
    ("fwd", 64, "16", True, "mask"): configs_from("128x64x8x3 64x64x4x2"),
    ("fwd", 64, "16", None, "kl"): configs_from("128x64x8x2 64x64x4x1"),
    ("fwd", 64, "16", None, "kl_mask"): configs_from("64x64x8x1 64x64x8x2"),
    ("fwd", 64, "16", False, "mask_ragged"): configs_from("128x64x8x3 64x64x4x2"),
    ("fwd", 128, "16", False, ""): configs_from("128x128x8x2 128x64x8x3 64x64x4x2"),
    ("fwd", 128, "16", False, "mask"): configs_from("128x64x8x3 64x64x4x2"),
    ("fwd", 128, "16", True, ""): configs_from("64x64x4x2 128x64x8x3"),
    ("fwd", 128, "16", True, "mask"): configs_from("128x64x8x3"),
    ("fwd", 128, "16", None, "kl"): configs_from("128x16x8x2 64x16x4x2"),
    ("fwd", 128, "16", None, "kl_mask"): configs_from("128x16x8x2 64x16x4x2"),
    ("fwd", 128, "16", False, "mask_ragged"): configs_from("128x16x8x2 64x16x4x2"),
    ("fwd", 128, "16", False, "key_ragged"): configs_from("128x64x8x3 64x64x4x2"),
    ("fwd", 256, "16", None, ""): configs_from("128x32x8x2 64x16x4x2"),
    ("fwd", 64, "tf32", False, ""): configs_from("128x64x8x3 64x64x4x2"),
    ("fwd", 64, "tf32", False, "mask"): configs_from("128x64x8x3 64x64x4x1"),
    ("fwd", 64, "tf32", True, ""): configs_from("128x64x8x1 64x64x4x1"),
    ("fwd", 64, "tf32", True, "mask"): configs_from("128x32x8x2 64x16x4x2"),
    ("fwd", 64, "tf32", True, "ragged"): configs_from("128x32x8x2 64x16x4x2"),
    ("fwd", 64, "tf32", None, "kl"): configs_from("128x32x8x2 64x16x4x2"),
    ("fwd", 64, "tf32", False, "kl"): configs_from("64x16x4x2"),
    ("fwd", 64, "tf32", None, "kl_mask"): configs_from("128x32x8x2 64x16x4x2"),
    ("fwd", 64, "tf32", False, "kl_mask"): configs_from("64x16x4x2"),
    ("fwd", 64, "tf32", False, "mask_ragged"): configs_from("128x64x8x3 64x64x4x1"),
    ("fwd", 128, "tf32", True, "mask"): configs_from("128x16x8x2"),
    ("fwd", 128, "tf32", False, "mask_ragged"): configs_from("128x16x8x2"),
    ("fwd", 128, "tf32", None, "kl"): configs_from("128x16x8x2"),
    ("fwd", 128, "tf32", None, "kl_mask"): configs_from("128x16x8x2"),
    ("fwd", 64, "3xtf32", None, ""): configs_from("128x64x8x2 128x32x8x2"),
    ("fwd", 64, "3xtf32", True, ""): configs_from("128x64x8x1 128x32x8x2"),
    ("fwd", 64, "3xtf32", True, "ragged"): configs_from("128x32x8x2"),
    ("fwd", 64, "3xtf32", None, "kl"): configs_from("64x16x4x2"),
    ("fwd", 64, "3xtf32", None, "kl_mask"): configs_from("64x16x4x2"),
    ("fwd", 64, "3xtf32", None, "mask"): configs_from("128x32x8x2"),
    ("fwd", 64, "3xtf32", False, "mask_ragged"): configs_from("128x16x8x2"),
    ("fwd", 128, "3xtf32", None, ""): configs_from("64x16x4x2"),
    ("fwd", 128, "3xtf32", True, ""): configs_from("128x16x8x2"),
    ("fwd", None, None, None, ""): configs_from("128x32x8x2 64x16x4x2"),
    ("preprocess", None, None, None, ""): configs_from("64x64x4x2 128x64x8x2"),
    ("preprocess", 128, "3xtf32", True, ""): configs_from("64x32x4x2"),
    ("dkdv", 64, "16", None, ""): configs_from("64x64x4x2 64x128x8x2"),
    ("dkdv", 64, "16", None, "kl"): configs_from("32x128x8x2 32x64x4x2"),
    ("dkdv", 64, "16", None, "ragged"): configs_from("32x64x4x2 32x128x8x1"),
    ("dkdv", 64, "16", None, "ragged_light"): configs_from("64x64x4x1 32x64x4x2"),
    ("dkdv", 64, "16", None, "gqa"): configs_from("64x128x8x2 32x128x8x2"),
    ("dkdv", 64, "16", None, "kl_gqa"): configs_from("16x64x4x1 16x128x8x1"),
    ("dkdv", 64, "16", None, "kl_ragged"): configs_from("32x64x4x1 32x128x8x2"),
    ("dkdv", 128, "16", None, ""): configs_from("32x128x8x2 32x128x8x1"),
    ("dkdv", 128, "16", None, "gqa"): configs_from("16x128x8x2"),
    ("dkdv", 128, "16", None, "kl_gqa"): configs_from("16x32x8x1"),
    ("dkdv", 128, "16", None, "ragged"): configs_from("16x128x8x2"),
    ("dkdv", 128, "16", None, "ragged_light"): configs_from("16x128x8x2"),
    ("dkdv", 128, "16", None, "kl"): configs_from("16x128x8x1 16x64x8x1"),
    ("dkdv", 128, "16", None, "kl_ragged"): configs_from("16x64x8x1"),
    ("dkdv", 128, "16", None, "mask"): configs_from("32x128x8x2 16x128x8x2"),
    ("dkdv", 128, "16", None, "dw"): configs_from("32x128x8x2 16x128x8x2"),
    ("dkdv", 128, "16", None, "mask_dw"): configs_from("16x128x8x2"),
    ("dkdv", 64, "tf32", None, ""): configs_from("32x128x8x2 32x64x4x2"),
    ("dkdv", 64, "tf32", None, "gqa"): configs_from("32x128x8x2 16x128x8x1"),
    ("dkdv", 64, "tf32", None, "kl"): configs_from("16x128x8x1 16x64x4x1"),
    ("dkdv", 64, "tf32", None, "kl_ragged"): configs_from("16x128x8x1 16x64x4x1"),
    ("dkdv", 64, "tf32", None, "kl_gqa"): configs_from("16x64x4x1 16x128x8x1"),
    ("dkdv", 64, "tf32", None, "ragged"): configs_from("16x128x8x1 16x64x4x1"),
    ("dkdv", 64, "tf32", None, "mask_dw"): configs_from("32x128x8x2 32x128x8x1"),
    ("dkdv", 128, "tf32", None, ""): configs_from("16x128x8x1 16x128x8x2"),
    ("dkdv", None, None, None, ""): configs_from("32x64x8x2"),
    ("dkdv", 64, "3xtf32", None, ""): configs_from("32x128x8x2 16x128x8x1"),
    ("dkdv", 64, "3xtf32", None, "heavy"): configs_from("16x128x8x1"),
    ("dkdv", 128, "3xtf32", None, ""): configs_from("32x64x4x1"),
    ("dq", 64, "3xtf32", None, ""): configs_from("128x32x8x2"),
    ("dq", 64, "3xtf32", False, "mask"): configs_from("128x16x8x2 64x16x4x2"),
    ("dq", 64, "3xtf32", None, "kl_mask"): configs_from("128x16x8x2"),
    ("dq", 128, "3xtf32", None, ""): configs_from("64x16x4x1"),
    ("dq", 64, "16", None, ""): configs_from("64x64x4x3 128x64x8x2"),
    ("dq", 128, "16", None, ""): configs_from("128x64x8x2 64x64x4x2"),
    ("dq", 64, "16", None, "mask"): configs_from("64x64x4x3 128x64x8x1"),
    ("dq", 64, "16", None, "kl_mask"): configs_from("128x32x8x2 64x64x8x1"),
    ("dq", 128, "16", None, "mask"): configs_from("128x16x8x2 64x32x8x2"),
    ("dq", 128, "16", None, "kl_mask"): configs_from("128x16x8x2 64x16x4x2"),
    ("dq", 128, "16", None, "kl"): configs_from("128x16x8x2 64x16x4x2"),
    ("dq", 64, "tf32", None, ""): configs_from("128x64x8x2 64x64x4x2"),
    ("dq", 64, "tf32", None, "kl"): configs_from("128x32x8x2 64x32x4x2"),
    ("dq", 64, "tf32", False, "kl_mask"): configs_from("128x16x8x2 64x16x4x2"),
    ("dq", 64, "tf32", True, "kl_mask"): configs_from("128x32x8x2 64x32x4x2"),
    ("dq", 64, "tf32", None, "mask"): configs_from("128x32x8x2 64x32x4x2"),
    ("dq", 128, "tf32", False, "kl"): configs_from("128x16x8x2"),
    ("dq", 128, "tf32", None, "kl_mask"): configs_from("128x16x8x2"),
    ("dq", 128, "tf32", False, "mask"): configs_from("128x16x8x2"),
    ("dq", None, None, None, ""): configs_from("128x32x8x2 64x16x4x2"),
}

_N1_FWD = configs_from("64x16x4x2")[0]


def _feature_class(kernel: str, named) -> str:
    if (kernel == "dkdv" and named.get("PRECISION") == "3xtf32"
            and (named.get("IS_CAUSAL") or named.get("GROUP", 1) > 1 or named.get("HAS_KL")
                 or named.get("HAS_MASK") and (not named.get("KEY_MASK") or named.get("HAS_DW")))):
        return "heavy"
    grouped = kernel == "dkdv" and named.get("GROUP", 1) > 1
    mask_2d = named.get("HAS_MASK") and not named.get("KEY_MASK")
    if named.get("HAS_KL"):
        heavy_kl = kernel != "dkdv" and (mask_2d or named.get("WRITE_DS"))
        feature = "kl_gqa" if grouped else ("kl_mask" if heavy_kl else "kl")
    elif grouped:
        feature = "gqa"
    elif mask_2d or named.get("WRITE_DS"):
        feature = "mask"
    else:
        feature = ""
    ragged = named.get("M", 0) % 16 or named.get("N", 0) % 16
    if feature == "kl" and kernel == "dkdv" and named.get("HAS_DW") and ragged:
        return "kl_ragged"
    if feature in ("kl", "kl_gqa", "kl_mask"):
        return feature
    if kernel == "dkdv" and named.get("HAS_DW"):
        if ragged or grouped:
            return "ragged" if feature else "ragged_light"
        return "mask_dw" if feature else "dw"
    if kernel == "fwd" and named.get("WRITE_MAPS") and named.get("N", 0) % 16 and not feature:
        return "ragged"
    if kernel == "fwd" and not named.get("WRITE_MAPS") and named.get("HAS_MASK") and named.get("N", 0) % 16:
        return "mask_ragged" if feature == "mask" else "key_ragged"
    return feature


def _lookup(kernel: str, named):
    """The table's list for this call: the most specific entry that matches (a feature class
    without an entry of its own falls back to the plain one), else the kernel's generic entry."""
    block_d = max(named["BLOCK_D"], named["BLOCK_DV"])
    d_class = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    dtype_class = "16" if named["Q"].element_size() == 2 else named["PRECISION"]
    maps = named.get("WRITE_MAPS", 0) != 0 or bool(named.get("HAS_DW"))
    feature = _feature_class(kernel, named)
    for key in ((kernel, d_class, dtype_class, maps, feature), (kernel, d_class, dtype_class, None, feature),
                (kernel, d_class, dtype_class, maps, ""), (kernel, d_class, dtype_class, None, ""),
                (kernel, None, None, None, "")):
        if key in _TABLE:
            return _TABLE[key]
    raise KeyError(kernel)


def size_key(n: int) -> int:
    """M_BUCKET / N_BUCKET: bucket(n), minus one when n is not a multiple of 16, so that the
    autotuner keys those calls apart (their candidates can differ: feature class "ragged"); 1 for
    n = 1 (a forward with one key has its own config, see _candidates)."""
    return 1 if n == 1 else bucket(n) - (1 if n % 16 else 0)


def _smem_bytes(kernel: str, cfg, named) -> int:
    """Shared memory the kernel's pipelined tiles need (the forward's exactly as the report measures,
    the backward's within a few KB): the tiles kept for the whole program (the forward's Q; K and V
    in dK/dV; Q and dO in dQ), num_stages copies of the streamed ones (K and V; Q and dO), and for the
    maps forward the tile staged for the coalesced map stores. Exact float32 keeps both TF32 parts."""
    rows = {"M": cfg.kwargs["BLOCK_M"], "N": cfg.kwargs["BLOCK_N"]}
    resident, streamed = ("N", "M") if kernel == "dkdv" else ("M", "N")
    width = named["BLOCK_D"] + named["BLOCK_DV"]
    resident_width = named["BLOCK_D"] if kernel == "fwd" else width
    size = named["Q"].element_size()
    parts = 2 if named.get("PRECISION") == "3xtf32" else 1
    smem = (rows[resident] * resident_width + cfg.num_stages * rows[streamed] * width) * size * parts
    if named.get("WRITE_MAPS", 0):
        smem += rows["M"] * rows["N"] * size
    return smem


def _candidates(kernel: str, named):
    """The table's list for the call, without configs over the device's shared memory and, when
    there are at most 64 rows, without 128-row blocks (the M loop of row-block kernels)."""
    if kernel == "fwd" and named["N"] == 1:
        # Triton compiles N == 1 as a constant; the causal maps variant at 128-row tiles then crashed
        # ptxas (SIGSEGV; Triton 3.6's and 3.8's ptxas, float32, found on an H200). One key per row:
        # the smallest tile is all the work needs. size_key keys N == 1 apart.
        return [_N1_FWD]
    configs = _lookup(kernel, named)
    limit = smem_limit(named["Q"].device)
    kept = [c for c in configs if _smem_bytes(kernel, c, named) <= limit]
    if kernel != "dkdv" and named["M_BUCKET"] <= 64:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 64] or kept
    return kept or [min(configs, key=lambda c: _smem_bytes(kernel, c, named))]


def _tuned(kernel_fn, kernel: str, key, reset_to_zero=()):
    return TunedKernel.from_table(kernel_fn, _TABLE, kernel, _FEATURES + key, partial(_candidates, kernel),
                                  reset_to_zero)


_fwd = _tuned(K.attention_fwd_kernel, "fwd", ["HAS_KL", "WRITE_MAPS"])
_preprocess = _tuned(K.attention_bwd_preprocess_kernel, "preprocess", ["HAS_DW", "HAS_DO"])
# DQ_ACC accumulates atomically (DQ_ATOMIC): zeroed around the autotuner's timing runs. Without
# DQ_ATOMIC it is a one-element placeholder, so zeroing it costs nothing.
_dkdv = _tuned(K.attention_bwd_dkdv_kernel, "dkdv",
               ["HAS_DW", "HAS_KL", "HAS_DO", "GROUP", "DQ_ATOMIC", "DK_DV"], reset_to_zero=["DQ_ACC"])
_dq = _tuned(K.attention_bwd_dq_kernel, "dq", ["HAS_DW", "HAS_KL", "HAS_DO", "WRITE_DS"])


def _common(q, k, v, mask, scale, is_causal):
    """(mask argument, mask strides, scales, constexprs) shared by every kernel of one call."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got q.dtype={q.dtype}; "
                        "use backend='torch' for float64")
    B, H, M, D = q.shape
    N, Dv = k.shape[2], v.shape[-1]
    if mask is not None:
        mask_bool = mask.dtype == torch.bool
        mask_arg = mask.view(torch.uint8) if mask_bool else mask
        mask_strides = _broadcast_strides(mask, (B, H, M, N))
    else:
        mask_bool, mask_arg, mask_strides = False, q, (0, 0, 0, 0)
    # Scores are |scale| * (sign(scale) q) . k: the kernels negate (or zero) q instead of the scores.
    q_sign = 1 if scale > 0 else (-1 if scale < 0 else 0)
    qk_scale = abs(scale) if scale != 0 else 1.0
    constexprs = dict(
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=_block(D), BLOCK_DV=_block(Dv),
        IS_CAUSAL=bool(is_causal), HAS_MASK=mask is not None, MASK_BOOL=mask_bool,
        # a mask that does not vary along the query rows (key padding) is read as one vector per block
        KEY_MASK=mask is not None and mask_strides[2] == 0,
        FLOAT_MASK=mask is not None and not mask_bool, Q_SIGN=q_sign,
        DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
        PRECISION=_precision(q.dtype, split_by_hand=_split_fits(q, D, Dv)),
    )
    return mask_arg, mask_strides, (qk_scale, qk_scale * LOG2E), constexprs


def _operands(constexprs, *tensors):
    """The kernels' product operands and LO (see kernels/interaction_attention.py `_dot_parts`): the tensors
    themselves and 0, or with PRECISION "3xtf32" their TF32 high parts, contiguous, in the first half
    of one float32 buffer whose second half holds the low parts at the same places, LO elements on.
    Costs two float32 copies of the tensors for the call; each part starts 64-byte aligned. None
    stays None."""
    if constexprs["PRECISION"] != "3xtf32":
        return (*tensors, 0)
    starts, lo = [], 0
    for t in tensors:
        starts.append(lo)
        lo += 0 if t is None else cdiv(t.numel(), SPLIT_ALIGN) * SPLIT_ALIGN
    parts = torch.empty(2 * lo, dtype=torch.float32, device=tensors[0].device)
    highs = []
    for t, start in zip(tensors, starts):
        if t is None:
            highs.append(None)
            continue
        n = t.numel()
        if n:
            K.tf32_split_kernel[(cdiv(n, SPLIT_BLOCK),)](t.contiguous(), parts[start:], n, lo, BLOCK=SPLIT_BLOCK)
        highs.append(parts[start:start + n].view(t.shape))
    return (*highs, lo)


def _split_fits(q, D: int, Dv: int) -> bool:
    """Whether exact float32 takes the launcher's split ("3xtf32"): with sm_90's shared memory (where
    the warpgroup products read both TF32 parts of the resident tiles from it; the config lists are
    sm_90's) and head dims up to 128. Otherwise Triton's "tf32x3" splits the operands in registers
    (see _launch._precision)."""
    return max(_block(D), _block(Dv)) <= 128 and smem_limit(q.device) >= SMEM_LIMIT_SM90


def _padded_row(N: int) -> int:
    """Row stride of the maps (and of dS, dW copies): N rounded up to a multiple of MAP_ROW_ALIGN."""
    return cdiv(N, MAP_ROW_ALIGN) * MAP_ROW_ALIGN


def _map_buffer(B, H, rows, N, dtype, device):
    """(B, H, rows, N) maps as a view of a buffer whose row stride is a multiple of MAP_ROW_ALIGN."""
    return torch.empty(B, H, rows, _padded_row(N), dtype=dtype, device=device)[..., :N]


def map_strides(B: int, H: int, rows: int, N: int) -> tuple[int, int, int, int]:
    """Strides of the maps this backend returns (the op's fake implementation matches them)."""
    padded = _padded_row(N)
    return (H * rows * padded, rows * padded, padded, 1)


def attention_forward(q, k, v, mask, scale: float, is_causal: bool, w_start: int, w_stop: int, kl_target=None):
    """Returns out (B, H, M, Dv) q.dtype, stats (B, H, M, 2) float32 (row max, log of the row sum),
    weights (B, H, w_stop-w_start, N) q.dtype, and with kl_target (4-D probabilities) kl and tnorm
    (B, H, M) float32, else None, None."""
    mask_arg, mask_strides, scales, constexprs = _common(q, k, v, mask, scale, is_causal)
    B, H, M, _ = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty(B, H, M, Dv, dtype=q.dtype, device=q.device)
    stats = torch.empty(B, H, M, 2, dtype=torch.float32, device=q.device)
    weights = _map_buffer(B, H, w_stop - w_start, N, q.dtype, q.device)
    write_maps = weights.numel() > 0
    # 0: no maps; 1: maps of a window of rows; 2: of every row (no single-pass code compiled)
    maps_mode = 0 if not write_maps else (2 if (w_start, w_stop) == (0, M) else 1)
    has_kl = kl_target is not None
    kl = tnorm = None
    if has_kl:
        kl, tnorm = (torch.empty(B, H, M, dtype=torch.float32, device=q.device) for _ in range(2))
    q_op, k_op, v_op, lo = _operands(constexprs, q, k, v)
    _fwd(
        lambda meta: cdiv(M, meta["BLOCK_M"]) * B * H,
        q_op, k_op, v_op, mask_arg, out, stats, weights if write_maps else out,
        kl_target if has_kl else out, kl if has_kl else stats, tnorm if has_kl else stats,
        *q_op.stride(), *k_op.stride(), *v_op.stride(), *mask_strides, *out.stride(),
        *_strides(weights if write_maps else None), *_broadcast_strides(kl_target, (B, H, M, N)),
        H, H // Hkv, M, N, *scales, w_start, w_stop, size_key(M), size_key(N), lo,
        HAS_KL=has_kl, WRITE_MAPS=maps_mode, **constexprs,
    )
    return out, stats, weights, kl, tnorm


def _copy_map_gradient(grad_weights, q, constexprs) -> bool:
    """Whether the backward copies dW into the maps' padded layout before the kernels read it: when
    its last dim is strided, or its rows are not 16-element aligned (e.g. autograd's sum of the
    gradient from out and a loss on the maps) except for 16-bit inputs at head dims <= 64. Compiled
    for sm_90 at N = 197 (benchmarks/RESULTS.md, 2026-12-04): read in place, the D = 128 dQ tiles
    spill (32-784 B) and the preprocess takes 3x the instructions; at D = 64 nothing spills and the
    backward's instructions per score grow ~12 %, less than the copy costs (a map read and written,
    and a map of memory at the backward's peak)."""
    if grad_weights.stride(-1) != 1:
        return True
    if grad_weights.stride(-2) % MAP_ROW_ALIGN == 0:
        return False
    return q.element_size() != 2 or max(constexprs["BLOCK_D"], constexprs["BLOCK_DV"]) > 64


def dkdv_parts(constexprs, has_do: bool, has_kl: bool, grouped: bool) -> tuple[int, ...]:
    """DK_DV of each dK/dV launch: (3,) one launch computing both; (2, 1) dV first, then dK (each
    program recomputes S; the dK launch also dP). Split for exact float32 (3xTF32) at head dims
    <= 64 with the fused KL or a 2-D mask and causal masking or grouped heads: one kernel for both
    holds two float32 accumulators and both TF32 parts of K, V and of each tile's Q and dO, and its
    tile (16x128 w8 s1; every other tile measured spills more) spilled 4-112 B in 82 of those 96
    calls of the combination sweep (sm_90, M = N = 197 and 1024, maps off and on); each part alone
    on that tile spills in none, for 1.27x the main-loop instructions per score (median; 1.18-1.45x;
    benchmarks/RESULTS.md, "Exact float32 dK/dV in two launches"). The other exact calls did not
    spill. Without dO there is no dV product to split off."""
    if not has_do or constexprs["PRECISION"] != "3xtf32" or max(constexprs["BLOCK_D"], constexprs["BLOCK_DV"]) > 64:
        return (3,)
    mask_2d = constexprs["HAS_MASK"] and not constexprs["KEY_MASK"]
    return (2, 1) if (has_kl or mask_2d) and (constexprs["IS_CAUSAL"] or grouped) else (3,)


def use_atomic_dq(mask_grad: bool) -> bool:
    """Whether the backward adds dQ atomically inside the dK/dV kernel (5 matrix products per tile
    pair instead of 7, as FlashAttention-2) instead of running the dQ kernel. Opt-in with
    LFI_DQ_ATOMIC=1: the compiled-kernel report counts 0.42 vs 0.58 SASS instructions per score
    element (bf16, D = 64), but it costs ~0.5 float32 atomics per score element in L2 (unmeasured
    on a GPU so far) and makes dQ's rounding order-dependent, so the default stays the
    deterministic dQ kernel. Never used when a float mask needs its gradient (the dQ kernel writes
    dS) or when torch's deterministic algorithms are on."""
    value = os.environ.get("LFI_DQ_ATOMIC", "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"LFI_DQ_ATOMIC must be 0 or 1, got {value!r}")
    return value == "1" and not mask_grad and not torch.are_deterministic_algorithms_enabled()


def attention_backward(grad_out, grad_weights, q, k, v, out, stats, mask, scale: float, is_causal: bool,
                       w_start: int, w_stop: int, mask_grad: bool, kl_target=None, tnorm=None, grad_kl=None):
    """Returns (dq, dk, dv, dmask); dmask is None unless mask_grad (float mask only). grad_out None:
    no gradient reaches out (the kernels skip dV and dO V^T; dv is zeros). grad_kl (B, H, M), any
    strides, is the gradient of the fused per-row KL against kl_target."""
    mask_arg, mask_strides, (qk_scale, qk_scale2), constexprs = _common(q, k, v, mask, scale, is_causal)
    if constexprs["PRECISION"] == "tf32x3" and max(constexprs["BLOCK_D"], constexprs["BLOCK_DV"]) > 128:
        # Every dK/dV and dQ tile measured needs more than sm_90's 227 KB there (32x64: 384 KB);
        # Triton would fail at launch with "out of resource: shared memory".
        raise ValueError(
            f"backend='triton': the float32 backward without TF32 supports head dims up to 128, got "
            f"q.shape[-1]={q.shape[-1]}, v.shape[-1]={v.shape[-1]} (its tiles exceed the GPU's shared memory); "
            "allow TF32 (torch.backends.cuda.matmul.allow_tf32 = True) or use backend='torch' or 'cuda'")
    has_do = grad_out is not None
    q_op, k_op, v_op, do_op, lo = _operands(constexprs, q, k, v, grad_out)
    if not has_do:
        grad_out = do_op = out  # placeholders the kernels do not read
    B, H, M, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    has_dw = grad_weights is not None and grad_weights.numel() > 0
    if has_dw and _copy_map_gradient(grad_weights, q, constexprs):
        grad_weights = _map_buffer(B, H, w_stop - w_start, N, grad_weights.dtype, q.device).copy_(grad_weights)
    g_arg = grad_weights if has_dw else grad_out
    g_strides = _strides(grad_weights if has_dw else None)
    has_kl = grad_kl is not None
    kl_args = (kl_target, tnorm, grad_kl) if has_kl else (q, stats, stats)
    kl_strides = (*_broadcast_strides(kl_target, (B, H, M, N)), *(grad_kl.stride() if has_kl else (0, 0, 0)))
    sizes = (M, N, qk_scale, qk_scale2, w_start, w_stop, size_key(M), size_key(N), lo)

    delta = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    _preprocess(
        lambda meta: cdiv(M, meta["BLOCK_M"]) * B * H,
        out, grad_out, delta, q_op, k_op, mask_arg, stats, g_arg,
        *out.stride(), *grad_out.stride(), *q_op.stride(), *k_op.stride(), *mask_strides, *g_strides,
        H, H // Hkv, *sizes,
        HAS_DW=has_dw, HAS_DO=has_do, **constexprs,
    )
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dq_atomic = use_atomic_dq(mask_grad)
    # dK/dV's separate edge-tile loop: with grouped heads it spills less at every dtype; with the fused
    # KL alone only for 16-bit inputs (float32's KL kernels spilled 4-48 B more with it, sm_90).
    edge_loop = H > Hkv or (has_kl and q.element_size() == 2)
    dq_acc = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if dq_atomic
              else torch.empty(1, dtype=torch.float32, device=q.device))
    for part in dkdv_parts(constexprs, has_do, has_kl, H > Hkv):
        _dkdv(
            lambda meta: cdiv(N, meta["BLOCK_N"]) * B * Hkv,
            q_op, k_op, v_op, mask_arg, do_op, g_arg, stats, delta, dk, dv, dq_acc, *kl_args,
            *q_op.stride(), *k_op.stride(), *v_op.stride(), *mask_strides, *do_op.stride(), *g_strides,
            *dk.stride(), *dv.stride(), *_strides(dq_acc if dq_atomic else None), *kl_strides,
            H, Hkv, H // Hkv, M, N, float(scale), *sizes[2:],
            HAS_DW=has_dw, HAS_KL=has_kl, HAS_DO=has_do, DQ_ATOMIC=dq_atomic, EDGE_LOOP=edge_loop, DK_DV=part,
            **constexprs,
        )
    if dq_atomic:
        return dq_acc.to(q.dtype), dk, dv, None
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # dS is written only when an additive mask needs its gradient (it is as large as the maps).
    # In the maps' padded layout: the kernel's dS row stride is cdiv(N, MAP_ROW_ALIGN) * MAP_ROW_ALIGN.
    ds = _map_buffer(B, H, M, N, torch.float32, q.device).zero_() if mask_grad else delta
    _dq(
        lambda meta: cdiv(M, meta["BLOCK_M"]) * B * H,
        q_op, k_op, v_op, mask_arg, do_op, g_arg, stats, delta, dq, ds, *kl_args,
        *q_op.stride(), *k_op.stride(), *v_op.stride(), *mask_strides, *do_op.stride(), *g_strides, *dq.stride(),
        *kl_strides,
        H, H // Hkv, M, N, float(scale), *sizes[2:],
        HAS_DW=has_dw, HAS_KL=has_kl, HAS_DO=has_do, WRITE_DS=mask_grad, **constexprs,
    )
    dmask = None
    if mask_grad:
        dims = [i for i, size in enumerate(mask.shape) if size == 1]
        dmask = (ds.sum(dims, keepdim=True) if dims else ds).to(mask.dtype).contiguous()
    return dq, dk, dv, dmask
