"""Launch helpers shared by the Triton launchers.

A kernel is launched in one of three ways, decided by one flag each:
- under the CPU interpreter (TRITON_INTERPRET=1), with one fixed, small block configuration;
- on a GPU, autotuned over a short list of configurations (pruned by dtype, head dim and shared
  memory before anything is compiled), keyed on power-of-two buckets of the sequence lengths, the
  head dims, the feature constexprs and the dtypes, so a new sequence length in the same bucket
  does not tune again;
- on a GPU with LFI_AUTOTUNE=0, with the documented heuristic default of each kernel (no tuning:
  one compilation per kernel and feature combination).
On a GPU, a launch whose arguments key as one made before calls the compiled kernel's launcher
directly, without Triton's per-launch argument binding (TunedKernel, "Direct launches").
"""
from __future__ import annotations

import functools
import os

import torch
import triton
from triton import knobs
from triton.runtime import driver

from lfi.kernels import INTERPRET

# Interpreter blocks: small, but distinct M and N blocks so that edge handling is exercised.
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}

# Opt-in shared memory per block (bytes) of sm_80 (A100) and sm_90 (H100/H200). Configs estimated
# above the device's limit are pruned; without a device (the compiled-kernel report) sm_90's.
SMEM_LIMIT_SM80 = 166912
SMEM_LIMIT_SM90 = 232448


def autotune_enabled() -> bool:
    """LFI_AUTOTUNE: "1" (default) autotunes on first use of a shape bucket, "0" uses heuristics."""
    value = os.environ.get("LFI_AUTOTUNE", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"LFI_AUTOTUNE must be 0 or 1, got {value!r}")
    return value == "1"


# Host-side integer helpers in plain Python: triton.cdiv / next_power_of_2 go through Triton's
# constexpr-function wrapper, 8 calls per forward: `benchmarks/launcher_overhead.py --what launcher`
# (launches stubbed out, bf16 ViT-B shape, this project's CPU) measured 42 us per forward with them,
# 25 us without.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def bucket(n: int) -> int:
    """Power-of-two bucket (>= 16) of a sequence length: the autotuner's key, not the exact size."""
    return max(16, next_power_of_2(n))


def config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def configs_from(text: str) -> list[triton.Config]:
    """'BMxBNxWARPSxSTAGES ...' -> [triton.Config] (the launchers' config tables)."""
    return [config(*map(int, c.split("x"))) for c in text.split()]


def table_configs(table: dict, kernel: str) -> list[triton.Config]:
    """Every config of one kernel in a launcher's table {(kernel, ...): [configs]} (the
    autotuner's list), without duplicates."""
    seen = {}
    for (name, *_), configs in table.items():
        if name == kernel:
            for c in configs:
                seen.setdefault((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c)
    return list(seen.values())


def fit_buckets(configs, m_bucket: int, n_bucket: int):
    """configs (in order) whose BLOCK_M and BLOCK_N do not exceed the bucketed sizes, or the list's
    smallest block along a dimension where the bucket is smaller than all of them (a 16-row call
    keeps the 64-row tiles of a list whose blocks all have 64 rows or more)."""
    rows = max(m_bucket, min(c.kwargs["BLOCK_M"] for c in configs))
    cols = max(n_bucket, min(c.kwargs["BLOCK_N"] for c in configs))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= cols]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _block(d: int) -> int:
    """Head-dim block: a power of two >= 16 (tl.dot needs every dim >= 16 when compiled)."""
    return max(16, next_power_of_2(d))


def _strides(t, ndim=4):
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _broadcast_strides(t, shape):
    """Strides of t read as broadcast to shape (0 along size-1 dims); zeros for None."""
    return tuple(t.expand(shape).stride()) if t is not None else (0,) * len(shape)


def _precision(dtype: torch.dtype, split_by_hand: bool = False) -> str:
    """tl.dot input precision of float32 inputs (16-bit inputs ignore it): TF32 tensor cores when
    torch.backends.cuda.matmul.allow_tf32, else 3xTF32 (each operand split into two TF32 parts,
    three tensor-core products: error within a few float32 ulps, where CUDA-core FMA tiles spill
    registers at every tile size worth running): Triton's "tf32x3", or with split_by_hand "3xtf32",
    the attention op's own split (the launcher splits Q, K, V and dO once, the kernels P and dS; see
    kernels/interaction_attention.py `_dot_parts`); plain float32 under the CPU interpreter."""
    if INTERPRET:
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "3xtf32" if split_by_hand else "tf32x3"
    return "tf32"


def smem_limit(device: torch.device | None = None) -> int:
    """Opt-in shared memory per block of a CUDA device (sm_90's limit for other devices)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return _cuda_smem_limit(torch.cuda.current_device() if device.index is None else device.index)
    return SMEM_LIMIT_SM90


@functools.lru_cache(maxsize=None)
def _cuda_smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT_SM80))


class TunedKernel:
    """One @triton.jit kernel with its autotuning list, pruning rule and heuristic default.

    prune(configs, named) -> the configs worth compiling for a call (named: the kernel's arguments
    by name, constexprs included); default(named) -> the one config used with LFI_AUTOTUNE=0.
    key: argument names the autotuner keys on (tensor dtypes are added by Triton).
    reset_to_zero: names of output arguments the kernel accumulates into (atomics): the autotuner
    zeroes them before each timed run and before the real launch, since timing runs the kernel many
    times on the caller's buffers."""

    @classmethod
    def from_table(cls, kernel, table: dict, name: str, key, candidates, reset_to_zero=()):
        """A kernel tuned over every config of `name` in a launcher's table; candidates(named) ->
        the ordered configs for one call: the autotuner's pruned list, its first the default."""
        return cls(kernel, table_configs(table, name), key, lambda configs, named: candidates(named),
                   lambda named: candidates(named)[0], reset_to_zero=reset_to_zero)

    def __init__(self, kernel, configs, key, prune, default, reset_to_zero=()):
        self.kernel = kernel
        self.key = key
        self.prune = prune
        self.default = default
        self.reset_to_zero = list(reset_to_zero)
        self.configs = list(configs)
        self._autotuner = None
        self._chosen = {}  # our key -> all_kwargs() of the config chosen for it (tuned or default)
        self._key_args = None  # (positions of the key's positional arguments, names of the keyword ones)
        self._launches = {}  # launch key -> (compiled kernel, config's all_kwargs(), arguments after args)

    @property
    def autotuner(self):
        if self._autotuner is None:
            self._autotuner = triton.autotune(
                configs=self.configs, key=self.key, reset_to_zero=self.reset_to_zero or None,
                prune_configs_by={
                    "early_config_prune": lambda configs, named, **kw: self.prune(configs, {**named, **kw})},
            )(self.kernel)
        return self._autotuner

    def _tuning_key(self, args, constexprs) -> tuple:
        """The autotuner's key for a call (the key arguments' values and the tensors' dtypes), from
        positions found on the first call: Triton's Autotuner.run rebuilds it from every argument by
        name on each call (a quadratic scan of ~70 names), which cost more host time than our whole
        launcher. The launchers pass a tensor for every pointer argument (placeholders included), so
        the tensors' positions do not change between calls (None there would key as None)."""
        if self._key_args is None:
            positional = self.kernel.arg_names[:len(args)]
            self._key_args = ([positional.index(k) for k in self.key if k in positional],
                              [k for k in self.key if k not in positional],
                              [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)])
        positions, names, tensors = self._key_args
        return (*(args[i] for i in positions), *(constexprs.get(k) for k in names),
                *(getattr(args[i], "dtype", None) for i in tensors))

    def __call__(self, grid, *args, **constexprs):
        """grid(meta) -> number of programs (1-D grid), meta holding BLOCK_M and BLOCK_N. A call
        whose key was seen before launches the config chosen then (the heuristic default, or the
        autotuner's pick) directly: the same launch as the autotuner's, minus its per-call work; a
        call whose launch key was seen before launches the compiled kernel directly (`_launch_key`)."""
        if INTERPRET:
            self._launch(grid, args, constexprs, INTERPRETER_BLOCKS)
            return
        tune = autotune_enabled()
        device = driver.active.get_current_device()
        launch_key = self._launch_key(device, tune, args, constexprs)
        seen = self._launches.get(launch_key) if launch_key is not None else None
        if seen is not None and not self._hooked():
            compiled, meta, tail = seen
            compiled.run(grid(meta), 1, 1, driver.active.get_current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *tail)
            return
        key = (tune, *self._tuning_key(args, constexprs))
        meta = self._chosen.get(key)
        if meta is None and not tune:
            cfg = self.default({**dict(zip(self.kernel.arg_names, args)), **constexprs})
            meta = self._chosen[key] = cfg.all_kwargs()
        if meta is not None:
            compiled = self._launch(grid, args, constexprs, meta)
            if launch_key is not None:
                self._remember(launch_key, compiled, meta, len(args), constexprs)
            return
        autotuner = self.autotuner
        autotuner.best_config = None  # set by this run (Autotuner.run records its pick there)
        autotuner[lambda meta: (grid(meta),)](*args, **constexprs)
        if isinstance(autotuner.best_config, triton.Config):
            self._chosen[key] = autotuner.best_config.all_kwargs()

    def _launch(self, grid, args, constexprs, meta):
        """One launch with the block sizes and options of `meta` (a config's all_kwargs()) through
        Triton's JITFunction.run; returns its compiled kernel (None under the interpreter)."""
        return self.kernel[(grid(meta),)](*args, **constexprs, **meta)

    # Direct launches. Triton's JITFunction.run binds and specializes every argument (~55 per
    # launch here), builds its cache key and looks the kernel up on each call: ~23 us of the ~80 us a
    # launch cost on the host (benchmarks/launcher_overhead.py, this project's CPU), 4 launches per
    # forward + backward. A launch whose key was seen before calls the compiled kernel's launcher
    # with the same arguments JITFunction.run would pass. The key holds every value Triton
    # specializes on, or a finer one: the current device, the knobs that change compile options, the
    # autotune flag (which decides the config with the rest), each constexpr, each integer argument's
    # value (Triton: 1, divisibility by 16, 32/64-bit; also inside tuples of integers), each tensor's
    # dtype and 16-byte alignment, and the type of other arguments (floats are not specialized).
    # Not repeated: JITFunction.run's check that the kernels' global constants were not reassigned.
    fast_launch = True  # False: every launch goes through JITFunction.run (the tests compare both)
    max_launches = 4096  # remembered launch keys per kernel; the cache is emptied when full

    def _launch_key(self, device, tune, args, constexprs):
        if not self.fast_launch:
            return None
        key = [device, tune, knobs.runtime.debug, knobs.compilation.instrumentation_mode, *constexprs.items()]
        append = key.append
        for a in args:
            cls = a.__class__
            if cls is int:
                append(a)
            elif isinstance(a, torch.Tensor):
                append(a.dtype)
                append(a.data_ptr() % 16 == 0)
            elif cls is float:
                append(float)
            elif a is None or cls is bool:
                append((cls, a))
            elif cls is tuple and all(x.__class__ is int for x in a):  # strides passed as one argument
                append(a)
            else:
                return None  # not an argument kind the key knows: JITFunction.run decides
        return tuple(key)

    def _remember(self, launch_key, compiled, meta, n_args, constexprs):
        """Remembers a launch made through JITFunction.run: its compiled kernel, config, and the
        arguments after the positional ones as Triton's binder fills them (constexprs, the config's
        block sizes, defaults), which the key fixes."""
        compiled = compiled.result() if hasattr(compiled, "result") else compiled  # an async compile's future
        if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            return
        named = {**constexprs, **meta}
        tail = tuple(named[p.name] if p.name in named else p.default for p in self.kernel.params[n_args:])
        if len(self._launches) >= self.max_launches:
            self._launches.clear()
        self._launches[launch_key] = (compiled, meta, tail)

    def _hooked(self) -> bool:
        """Whether anything observes launches (a profiler's launch hooks, Triton's pre-run or pass
        hooks): such launches go through JITFunction.run, which calls them."""
        runtime = knobs.runtime
        return bool(self.kernel.pre_run_hooks or getattr(runtime, "add_stages_inspection_hook", None)
                    or _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook))


def _hook_set(hook) -> bool:
    """A launch hook that does something: Triton >= 3.5 keeps a HookChain, empty by default."""
    return hook is not None and bool(getattr(hook, "calls", True))
