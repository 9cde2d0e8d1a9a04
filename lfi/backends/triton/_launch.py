"""Launch helpers shared by the Triton launchers: on a GPU each kernel is autotuned over its block
sizes (keyed by the problem's sizes and flags); under the CPU interpreter (where autotuning needs
a GPU) one fixed, small configuration is passed explicitly."""
from __future__ import annotations

import torch
import triton

from lfi.kernels import INTERPRET

# Interpreter blocks: small, but distinct M and N blocks so that edge handling is exercised.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}


def _configs(shapes, warps=(4, 8), stages=(2, 3)):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn in shapes for w in warps for s in stages]


def _block(d: int) -> int:
    """Head-dim block: a power of two >= 16 (tl.dot needs every dim >= 16 when compiled)."""
    return max(16, triton.next_power_of_2(d))


def _strides(t, ndim=4):
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _broadcast_strides(t, shape):
    """Strides of t read as broadcast to shape (0 along size-1 dims); zeros for None."""
    return tuple(t.expand(shape).stride()) if t is not None else (0,) * len(shape)


def _prune_for_head_dim(configs, named_args, **kwargs):
    """Large head dims need smaller tiles to fit shared memory. Same limits as the attention
    launcher's, over every head-dim block constexpr named BLOCK_D* (e.g. a teacher's BLOCK_DT)."""
    args = {**named_args, **kwargs}
    block_d = max([64] + [v for name, v in args.items() if name.startswith("BLOCK_D") and isinstance(v, int)])
    limit = 128 * 128 if block_d <= 64 else (128 * 64 if block_d <= 128 else 64 * 64)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[-1:]


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact float32 when asked for (or interpreting), else TF32."""
    precise = INTERPRET or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return "ieee" if precise else "tf32"


class Launcher:
    """Launches the @triton.jit kernels of one module by name.

    tuning: {kernel name: (configs, autotune key)}. grid(meta) -> program count (1-D grid)."""

    def __init__(self, module, tuning: dict, prune=_prune_for_head_dim):
        self.module = module
        self.tuning = tuning
        self.prune = prune
        self._tuned: dict = {}

    def kernel(self, name: str):
        if INTERPRET:
            return getattr(self.module, name)
        if name not in self._tuned:
            configs, key = self.tuning[name]
            prune = {"early_config_prune": self.prune} if self.prune is not None else None
            self._tuned[name] = triton.autotune(configs=configs, key=key, prune_configs_by=prune)(
                getattr(self.module, name))
        return self._tuned[name]

    def __call__(self, name: str, grid, *args, **constexprs):
        if INTERPRET:
            getattr(self.module, name)[(grid(INTERPRETER_BLOCKS),)](*args, **constexprs, **INTERPRETER_BLOCKS)
        else:
            self.kernel(name)[lambda meta: (grid(meta),)](*args, **constexprs)
