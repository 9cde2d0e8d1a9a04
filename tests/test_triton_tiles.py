"""The Triton attention kernels' tile structure, under every tile shape the launchers can choose.

The kernels split each pass into a main loop without bounds or causal predicates and EDGE tiles
(the ragged block and the causal diagonal), read key-padding masks as one vector per key block,
negate q for a negative scale, write maps of a row window or of all rows, and store maps in a
buffer with padded rows. These paths depend on the tile shape (BLOCK_M > BLOCK_N puts several key
blocks on the diagonal; BLOCK_N > BLOCK_M several query blocks in the dK/dV kernel), so the cases
below run under several interpreter tile shapes, with outputs poisoned (torch.empty returns NaN)
so that any element a kernel fails to write fails the comparison. The launchers' config choice
(pure Python) is tested at the end.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers import BACKENDS
from helpers import DEVICE
from helpers import assert_close
from helpers import bool_mask
from helpers import float_mask
from helpers import force_exact_fp32_split
from helpers import make_gen
from helpers import make_qkv
from helpers import record_dkdv_parts
from helpers import run_and_compare

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend is not usable here")

TILES = [(16, 32), (32, 16), (16, 16)]

CASES = [
    dict(id="causal_square", M=37, N=37, causal=True),
    dict(id="causal_wide", M=19, N=45, causal=True),
    dict(id="causal_tall", M=45, N=19, causal=True, rows=(3, 40)),
    dict(id="ragged_maps_window", M=35, N=50, rows=(17, 33)),
    dict(id="bool_mask_causal", M=33, N=33, causal=True, mask="bool"),
    dict(id="key_padding_bool", M=21, N=47, mask="key_bool"),
    dict(id="key_padding_float_rows", M=21, N=47, mask="key_float", rows=(0, 5)),
    dict(id="float_mask_dead_rows", M=24, N=40, mask="float_dead"),
    dict(id="gqa_causal", M=33, N=33, causal=True, H=4, Hkv=2),
    dict(id="gqa_causal_wide_mask", M=19, N=45, causal=True, H=4, Hkv=2, mask="bool"),
    dict(id="gqa_causal_tall_rows", M=45, N=19, causal=True, H=6, Hkv=2, rows=(3, 40)),
    dict(id="gqa_key_padding_ragged", M=21, N=47, H=4, Hkv=2, mask="key_float", rows=(0, 5)),
    dict(id="negative_scale", M=18, N=34, scale=-0.4),
    dict(id="zero_scale_causal", M=18, N=34, scale=0.0, causal=True, mask="key_bool"),
]


@pytest.fixture
def poisoned_empty():
    """torch.empty fills float tensors with NaN (deterministic mode's uninitialized-memory fill)."""
    from torch.utils import deterministic

    previous = torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    deterministic.fill_uninitialized_memory = previous[1]


def _mask(kind, B, H, M, N, gen):
    if kind is None:
        return None
    if kind == "bool":
        return bool_mask((B, H, M, N), gen)
    if kind == "key_bool":
        m = bool_mask((B, 1, 1, N), gen)
        m[..., 0] = True  # every row keeps a key (causal rows see key 0)
        return m
    if kind == "key_float":
        m = float_mask((B, 1, 1, N), gen)
        m[0, ..., N // 2:] = float("-inf")  # padding at the end of the first sequence
        return m
    if kind == "float_dead":
        m = float_mask((1, H, M, N), gen)
        m[0, 1, 3] = float("-inf")  # a row with no attended key
        m[0, 0, 5] = -1e30  # a uniform row
        return m
    raise ValueError(kind)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="interpreter tile shapes are a CPU (TRITON_INTERPRET) test")
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in CASES])
@pytest.mark.parametrize("tile", TILES, ids=[f"{m}x{n}" for m, n in TILES])
def test_tile_paths(case, tile, monkeypatch, poisoned_empty):
    from lfi.backends.triton import _launch

    monkeypatch.setattr(_launch, "INTERPRETER_BLOCKS", {"BLOCK_M": tile[0], "BLOCK_N": tile[1]})
    _run_case(case, tile)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="interpreter tile shapes are a CPU (TRITON_INTERPRET) test")
@pytest.mark.parametrize("tile", TILES, ids=[f"{m}x{n}" for m, n in TILES])
@pytest.mark.parametrize("mask_kind, Hkv, dtype", [("key_bool", 1, torch.float32), (None, 1, torch.float32),
                                                   (None, 2, torch.float32), ("key_bool", 2, torch.float16)],
                         ids=["key_mask_gqa", "gqa", "heads", "key_mask_fp16"])
def test_fused_kl_tiles(tile, mask_kind, Hkv, dtype, monkeypatch, poisoned_empty):
    """The fused KL's online pieces across EDGE tiles and both map modes (H = 2): with grouped heads
    (Hkv = 1) or 16-bit inputs, dK/dV runs its edge tiles in their own loop, otherwise unrolled; with a
    key mask and with causal masking alone (where dK/dV zeroes the target above the diagonal without
    the scores)."""
    from lfi.backends.triton import _launch
    from lfi.ops import interaction_attention

    monkeypatch.setattr(_launch, "INTERPRETER_BLOCKS", {"BLOCK_M": tile[0], "BLOCK_N": tile[1]})
    gen = make_gen("kl_tiles", tile, mask_kind, Hkv, dtype)
    q, k, v = make_qkv(2, 2, Hkv, 21, 37, 24, dtype=dtype, gen=gen, requires_grad=True)
    mask = _mask(mask_kind, 2, 2, 21, 37, gen)
    target = torch.softmax(torch.randn(2, 1, 21, 37, generator=gen), -1).to(DEVICE)
    for rows in (None, (4, 15)):
        kw = dict(need_weights=rows is not None, weights_rows=rows, kl_target=target, kl_reduction="none",
                  is_causal=True)
        got = interaction_attention(q, k, v, mask, backend="triton", **kw)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = interaction_attention(q64, k64, v64, mask, backend="torch", **kw)
        for n, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, dtype, name=f"output {n} rows={rows}")
        weights = [torch.randn(w.shape, generator=gen).to(DEVICE) for w in want]
        grads = torch.autograd.grad(sum((g.float() * r).sum() for g, r in zip(got, weights)), (q, k, v))
        grads64 = torch.autograd.grad(sum((w * r.double()).sum() for w, r in zip(want, weights)), (q64, k64, v64))
        for name, g, w in zip("qkv", grads, grads64):
            assert_close(g, w, dtype, grad=True, name=f"grad {name} rows={rows}")


ATOMIC_CASES = [c for c in CASES if c["id"] in ("causal_tall", "gqa_causal", "key_padding_float_rows",
                                                 "negative_scale", "zero_scale_causal")]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="interpreter tile shapes are a CPU (TRITON_INTERPRET) test")
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in ATOMIC_CASES])
@pytest.mark.parametrize("tile", TILES[:2], ids=[f"{m}x{n}" for m, n in TILES[:2]])
def test_atomic_dq(case, tile, monkeypatch):
    """LFI_DQ_ATOMIC=1: dQ accumulated in the dK/dV kernel (no poisoning here: torch's
    deterministic mode would switch the atomics off)."""
    from lfi.backends.triton import _launch
    from lfi.backends.triton import interaction_attention as launcher

    monkeypatch.setattr(_launch, "INTERPRETER_BLOCKS", {"BLOCK_M": tile[0], "BLOCK_N": tile[1]})
    monkeypatch.setenv("LFI_DQ_ATOMIC", "1")
    assert launcher.use_atomic_dq(mask_grad=False) and not launcher.use_atomic_dq(mask_grad=True)
    _run_case(case, tile)


def test_atomic_dq_autotuner_zeroes_accumulator():
    """Autotuning times each dK/dV config several times on the caller's buffers: the atomic dQ
    accumulator must be zeroed around those runs (Triton's reset_to_zero), and a tuned config must
    not carry over between the atomic and the plain variant (DQ_ATOMIC in the key)."""
    from lfi.backends.triton import interaction_attention as launcher

    dkdv = launcher._dkdv
    assert dkdv.reset_to_zero == ["DQ_ACC"] and "DQ_ACC" in dkdv.kernel.arg_names
    assert "DQ_ATOMIC" in dkdv.key
    assert dkdv.autotuner.reset_to_zero == ["DQ_ACC"]
    assert all(not tuned.reset_to_zero for tuned in (launcher._fwd, launcher._preprocess, launcher._dq))


class _RecordingKernel:
    """Stands in for a compiled @triton.jit kernel (no GPU here): records each launch's grid size and
    block sizes, as JITFunction.run receives them from the autotuner or a direct launch."""

    arg_names = ["X", "N_BUCKET", "N", "HAS_MASK", "BLOCK_M", "BLOCK_N"]

    def __init__(self):
        self.fn = lambda: None  # what triton.autotune unwraps to find the kernel's Python function
        self.launches = []

    def run(self, *args, grid, warmup=False, **kwargs):
        meta = {**dict(zip(self.arg_names, args)), **kwargs}
        self.launches.append((grid(meta)[0] if callable(grid) else grid[0], meta["BLOCK_M"], meta["num_warps"]))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, **kwargs)


def test_tuned_kernel_launches_the_chosen_config_directly(monkeypatch):
    """Compiled mode (faked: no GPU here). The first call of a key autotunes (every candidate timed,
    the fastest launched); later calls with that key launch the autotuner's pick directly, without
    Triton's Autotuner.run and its per-call key building; a new key tunes again; LFI_AUTOTUNE=0
    launches the default, computed once per key."""
    import triton

    from lfi.backends.triton import _launch

    slow, fast = _launch.configs_from("16x16x4x1 32x32x8x2")
    timings = {slow.kwargs["BLOCK_M"]: 2.0, fast.kwargs["BLOCK_M"]: 1.0}
    benched = []

    def bench(kernel_call, quantiles=None, **_):
        kernel = tuned.kernel
        kernel_call()
        benched.append(kernel.launches.pop()[1])
        return [timings[benched[-1]]] * 3

    class Driver:
        def get_benchmarker(self):
            return bench

        def get_current_device(self):
            return 0

    monkeypatch.setattr(triton.runtime.driver, "_active", Driver())
    autotuner_runs = []
    autotuner_run = triton.runtime.autotuner.Autotuner.run
    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run",
                        lambda self, *a, **k: autotuner_runs.append(1) or autotuner_run(self, *a, **k))
    monkeypatch.setattr(_launch, "INTERPRET", False)
    monkeypatch.setenv("LFI_AUTOTUNE", "1")
    defaults = []

    def default(named):
        defaults.append(named["N"])
        return slow

    tuned = _launch.TunedKernel(_RecordingKernel(), [slow, fast], ["N_BUCKET", "HAS_MASK"],
                                lambda configs, named: configs, default)
    x = torch.zeros(4)
    grid = lambda meta: _launch.cdiv(1000, meta["BLOCK_M"])  # noqa: E731

    tuned(grid, x, 64, 50, HAS_MASK=False)
    assert benched == [16, 32] and tuned.kernel.launches == [(32, 32, 8)]
    tuned(grid, x, 64, 60, HAS_MASK=False)  # same key: the pick, launched directly
    assert benched == [16, 32] and tuned.kernel.launches == [(32, 32, 8)] * 2 and len(autotuner_runs) == 1
    timings.update({16: 0.5})
    tuned(grid, x, 128, 100, HAS_MASK=False)  # new bucket: tuned again, another pick
    tuned(grid, x, 64, 50, HAS_MASK=True)  # a constexpr of the key: tuned again
    assert benched == [16, 32] * 3 and tuned.kernel.launches[2:] == [(63, 16, 4)] * 2
    tuned(grid, x, 128, 110, HAS_MASK=False)
    assert len(benched) == 6 and tuned.kernel.launches[4] == (63, 16, 4) and len(autotuner_runs) == 3

    monkeypatch.setenv("LFI_AUTOTUNE", "0")
    tuned(grid, x, 64, 50, HAS_MASK=False)
    tuned(grid, x, 64, 51, HAS_MASK=False)
    assert defaults == [50] and len(benched) == 6 and tuned.kernel.launches[5:] == [(63, 16, 4)] * 2
    assert len(autotuner_runs) == 3


SPLIT_TF32_CASES = [c for c in CASES if c["id"] in ("causal_tall", "ragged_maps_window", "key_padding_float_rows",
                                                 "float_mask_dead_rows", "gqa_causal", "negative_scale",
                                                 "bool_mask_causal", "gqa_causal_wide_mask")]
# A 2-D mask with causal masking or grouped heads: exact float32 dK/dV in two launches (the
# launcher's dkdv_parts).
DKDV_SPLIT_CASES = {"bool_mask_causal", "gqa_causal_wide_mask"}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="interpreter tile shapes are a CPU (TRITON_INTERPRET) test")
def test_tf32_parts():
    """The launcher's split of exact-float32 operands (_operands -> tf32_split_kernel -> _tf32_parts):
    both parts exact in TF32 (low 13 mantissa bits clear), rounded to nearest, their sum within 2^-22
    of x; non-finite x (the GPUs' canonical NaN 0x7FFFFFFF and a negative NaN among them, which the
    rounding would carry into the sign bit) and the float32 maximum (whose rounding overflows) split
    as (0, x); each tensor's high part a contiguous view, its low part LO elements on, 64-byte aligned."""
    from lfi.backends.triton import interaction_attention as launcher

    gen = make_gen("tf32_parts")
    x = torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-60, 60, (4096,), generator=gen).float())
    x[:4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    special = x[4096 - 4:]
    special.view(torch.int32)[:2] = torch.tensor([0x7FFFFFFF, -1], dtype=torch.int32)  # NaN payloads
    special[2:] = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    x[4:6] = torch.tensor([1.0 + 2.0**-11, -(1.0 + 3 * 2.0**-11)])  # ties: away from zero
    other = torch.randn(3, 5, 7, generator=gen).transpose(0, 2)  # strided, 105 elements: a ragged block
    highs = launcher._operands({"PRECISION": "3xtf32"}, other, x)
    lo_offset = highs[-1]
    assert lo_offset == 112 + 4096 and all(h.is_contiguous() for h in highs[:2])
    parts = highs[0].untyped_storage()
    assert highs[1].data_ptr() - highs[0].data_ptr() == 112 * 4 and highs[0].data_ptr() % 64 == 0

    def low(high):
        return torch.empty(0).set_(parts, high.storage_offset() + lo_offset, high.shape, high.stride())

    hi, lo = highs[1], low(highs[1])
    torch.testing.assert_close(highs[0] + low(highs[0]), other, atol=0, rtol=2.0**-22)
    assert highs[0].shape == other.shape
    for i in (0, 1, 2, 4092, 4093, 4094, 4095):
        assert hi[i] == 0 and lo[i].view(torch.int32) == x[i].view(torch.int32), i  # (0, x), bit for bit
    assert hi[3] == 0 and lo[3] == 0
    assert hi[4] == 1.0 + 2.0**-10 and hi[5] == -(1.0 + 2 * 2.0**-10)
    for part in (hi, lo):
        assert not (part[6:4092].view(torch.int32) & 0x1FFF).any()
    x64, hi64 = x[6:4092].double(), hi[6:4092].double()
    assert ((x64 - hi64).abs() <= x64.abs() * 2.0**-11).all()  # hi: nearest TF32 value
    assert ((hi64 + lo[6:4092].double() - x64).abs() <= x64.abs() * 2.0**-22).all()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="interpreter tile shapes are a CPU (TRITON_INTERPRET) test")
@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in SPLIT_TF32_CASES])
def test_3xtf32_path(case, monkeypatch, poisoned_empty):
    """Float32 with allow_tf32 off compiles to 3xTF32 products (PRECISION "3xtf32"): Q, K, V and dO
    split into TF32 parts by the launcher, P and dS by the kernels; the interpreter multiplies the TF32
    parts exactly, as tensor cores do, so this runs that code against the float64 reference at
    float32 tolerances (a missing product or a low part read from the wrong place fails it). With a
    2-D mask and causal masking or GQA, dK/dV run as two launches (dV, then dK) when dO reaches the
    kernels: here without maps (with them, autograd.grad(inputs=...) observes the maps' gradient, so
    attention_pv computes dV and the kernels run without dO)."""
    from lfi.backends.triton import _launch

    force_exact_fp32_split(monkeypatch)
    parts = record_dkdv_parts(monkeypatch)
    monkeypatch.setattr(_launch, "INTERPRETER_BLOCKS", {"BLOCK_M": 16, "BLOCK_N": 32})
    _run_case(case, (16, 32))
    if case["id"] in DKDV_SPLIT_CASES:
        parts.clear()
        _run_case(case, (16, 32), need_weights=False)
        assert parts == [2, 1]
    else:
        assert parts == [3]


def _run_case(case, tile, need_weights=True):
    gen = make_gen("tiles", case["id"], tile, *(() if need_weights else ("no_maps",)))
    B, H, Hkv, M, N = 2, case.get("H", 2), case.get("Hkv", 2), case["M"], case["N"]
    q, k, v = make_qkv(B, H, Hkv, M, N, 40, gen=gen, requires_grad=True)
    mask = _mask(case.get("mask"), B, H, M, N, gen)
    run_and_compare("triton", q, k, v, mask, is_causal=case.get("causal", False), scale=case.get("scale"),
                    need_weights=need_weights, rows=case.get("rows") if need_weights else None,
                    loss="both" if need_weights else "out", gen=gen)



def test_maps_buffer_rows_are_padded():
    """Triton maps are a view with a row stride that is a multiple of 16 elements."""
    from lfi.ops import interaction_attention

    gen = make_gen("padded_maps")
    q, k, v = make_qkv(1, 2, 2, 5, 19, 16, gen=gen)
    _, w = interaction_attention(q, k, v, need_weights=True, backend="triton")
    assert w.shape == (1, 2, 5, 19) and w.stride(-1) == 1 and w.stride(-2) % 16 == 0
    _, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    assert w.is_contiguous()


# --------------------------------------------------------------------------------------------------
# Config choice (pure Python: runs anywhere)
# --------------------------------------------------------------------------------------------------

def _named(dtype=torch.bfloat16, D=64, M=1024, maps=0, precision="tf32", N=1024, **extra):
    from lfi.backends.triton._launch import _block
    from lfi.backends.triton._launch import bucket

    return {"Q": torch.empty(1, dtype=dtype, device="meta"), "BLOCK_D": _block(D), "BLOCK_DV": _block(D),
            "M_BUCKET": bucket(M), "PRECISION": precision, "WRITE_MAPS": maps, "M": M, "N": N, **extra}


def _shape(cfg):
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def test_dkdv_parts():
    """Exact float32 dK/dV runs as two launches (dV, then dK) only at head dims <= 64, with dO, and
    with the fused KL or a 2-D mask together with causal masking or grouped heads."""
    from lfi.backends.triton.interaction_attention import dkdv_parts

    def parts(precision="3xtf32", d=64, causal=False, mask=None, has_do=True, kl=False, grouped=False):
        constexprs = {"PRECISION": precision, "BLOCK_D": d, "BLOCK_DV": d, "IS_CAUSAL": causal,
                      "HAS_MASK": mask is not None, "KEY_MASK": mask == "key"}
        return dkdv_parts(constexprs, has_do, kl, grouped)

    for split in (dict(kl=True, causal=True), dict(kl=True, grouped=True), dict(mask="2d", causal=True),
                  dict(mask="2d", grouped=True), dict(kl=True, mask="key", causal=True, grouped=True)):
        assert parts(**split) == (2, 1), split
        for other in (dict(precision="tf32"), dict(precision="ieee"), dict(d=128), dict(has_do=False)):
            assert parts(**{**split, **other}) == (3,), (split, other)
    for whole in (dict(), dict(kl=True), dict(mask="2d"), dict(causal=True, grouped=True), dict(kl=True, mask="2d"),
                  dict(mask="key", causal=True, grouped=True)):
        assert parts(**whole) == (3,), whole


def test_config_tables():
    from lfi.backends.triton import interaction_attention as launcher
    from lfi.backends.triton._launch import table_configs

    pick = launcher._candidates
    assert _shape(pick("fwd", _named())[0]) == (128, 128, 8, 2)
    # at most 64 rows: no 128-row blocks
    assert all(c.kwargs["BLOCK_M"] <= 64 for c in pick("fwd", _named(M=16)))
    # maps at D = 128: the no-spill list
    assert [_shape(c) for c in pick("fwd", _named(D=128, maps=2))] == [(64, 64, 4, 2), (128, 64, 8, 3)]
    # exact float32 (3xTF32, both parts of each tile in shared memory): the no-spill lists of the report;
    # dK/dV with causal, GQA, the fused KL, a 2-D mask or a mask with map gradients takes 16-row tiles
    # (its 32-row tile spills there), with maps at the ViT shape the plain list
    exact = dict(dtype=torch.float32, precision="3xtf32")
    assert [_shape(c) for c in pick("fwd", _named(**exact))] == [(128, 64, 8, 2), (128, 32, 8, 2)]
    assert [_shape(c) for c in pick("fwd", _named(**exact, HAS_KL=True))] == [(64, 16, 4, 2)]
    assert [_shape(c) for c in pick("dkdv", _named(**exact))] == [(32, 128, 8, 2), (16, 128, 8, 1)]
    assert [_shape(c) for c in pick("dkdv", _named(**exact, HAS_DW=True, M=197, N=197))] == [(32, 128, 8, 2),
                                                                                            (16, 128, 8, 1)]
    for heavy in (dict(IS_CAUSAL=True), dict(GROUP=2, HAS_DW=True), dict(HAS_KL=True),
                  dict(HAS_MASK=True, KEY_MASK=False), dict(HAS_MASK=True, KEY_MASK=True, HAS_DW=True)):
        assert [_shape(c) for c in pick("dkdv", _named(**exact, **heavy))] == [(16, 128, 8, 1)], heavy
    assert [_shape(c) for c in pick("dkdv", _named(**exact, HAS_MASK=True, KEY_MASK=True))][0] == (32, 128, 8, 2)
    assert [_shape(c) for c in pick("dq", _named(**exact, IS_CAUSAL=True))] == [(128, 32, 8, 2)]
    # at D = 128 one list per kernel, within sm_90's shared memory with both parts
    assert [[_shape(c) for c in pick(kernel, _named(D=128, **exact))] for kernel in ("fwd", "dkdv", "dq")] == [
        [(64, 16, 4, 2)], [(32, 64, 4, 1)], [(64, 16, 4, 1)]]
    # TF32 dK/dV at D = 128: 16x128 tiles (the generic 32x64 spills with causal and takes twice the
    # instructions per score)
    assert [_shape(c) for c in pick("dkdv", _named(torch.float32, 128, IS_CAUSAL=True))] == [(16, 128, 8, 1),
                                                                                          (16, 128, 8, 2)]
    # distinct configs per kernel, as RESULTS.md and README state them (the autotuners' lists)
    assert {kernel: len(table_configs(launcher._TABLE, kernel)) for kernel in ("fwd", "preprocess", "dkdv", "dq")} \
        == {"fwd": 12, "preprocess": 3, "dkdv": 13, "dq": 11}
    # candidates compiled per call (RESULTS.md: at most 3), for bf16 D = 64, fp16 D = 128, TF32 D = 64
    # and bf16 D = 256
    calls = (_named(), _named(torch.float16, 128), _named(torch.float32, 64), _named(D=256))
    counts = {"fwd": [3, 3, 2, 2], "preprocess": [2, 2, 2, 1], "dkdv": [2, 2, 2, 1], "dq": [2, 2, 2, 2]}
    for kernel in ("fwd", "preprocess", "dkdv", "dq"):
        configs = table_configs(launcher._TABLE, kernel)
        assert len({_shape(c) for c in configs}) == len(configs)
        kept = [pick(kernel, dict(named)) for named in calls]
        assert [len(k) for k in kept] == counts[kernel], kernel
        for named, configs_kept in zip(calls, kept):
            assert all(launcher._smem_bytes(kernel, c, named) <= launcher.smem_limit(None) for c in configs_kept)
    # one key (N = 1): the forward's own small tile (ptxas crashed on 128-row tiles), keyed apart
    assert [_shape(c) for c in pick("fwd", _named(N=1, maps=2, IS_CAUSAL=True))] == [(64, 16, 4, 2)]
    assert [_shape(c) for c in pick("fwd", _named(N=2, maps=2))][0] != (64, 16, 4, 2)
    assert launcher.size_key(1) == 1 and launcher.size_key(5) == 15 and launcher.size_key(16) == 16


def test_exact_float32_split_fits_shared_memory(monkeypatch):
    """The launcher's own TF32 split keeps both parts of the resident tiles in shared memory: taken with
    sm_90's shared memory up to head dim 128; otherwise Triton's in-register "tf32x3"."""
    from lfi.backends.triton import interaction_attention as launcher

    q = torch.empty(1, dtype=torch.float32, device="meta")
    assert launcher._split_fits(q, 64, 64) and launcher._split_fits(q, 80, 128)
    assert not launcher._split_fits(q, 256, 64) and not launcher._split_fits(q, 64, 160)
    monkeypatch.setattr(launcher, "smem_limit", lambda device: 166912)
    assert not launcher._split_fits(q, 64, 40)


def test_exact_float32_backward_refuses_head_dims_over_128(monkeypatch):
    """Float32 without TF32 at head dim 256 ("tf32x3"): every backward tile exceeds sm_90's shared
    memory (kernel_report: dK/dV 384 KB, dQ 320 KB), so the launcher refuses with a clear error before
    anything is launched, naming the head dims and the ways out."""
    from lfi.backends.triton import interaction_attention as launcher

    monkeypatch.setattr(launcher, "_precision", lambda dtype, split_by_hand=False: "tf32x3")
    q, k, v = (torch.randn(1, 1, 4, 256) for _ in range(3))
    out, stats = torch.empty_like(q), torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match=r"head dims up to 128.*q.shape\[-1\]=256.*allow_tf32"):
        launcher.attention_backward(torch.randn_like(q), None, q, k, v, out, stats, None, 0.1, False, 0, 0, False)
    launched = []
    monkeypatch.setattr(launcher, "_dq", lambda *a, **kw: launched.append("dq"))
    monkeypatch.setattr(launcher, "_dkdv", lambda *a, **kw: launched.append("dkdv"))
    monkeypatch.setattr(launcher, "_preprocess", lambda *a, **kw: launched.append("preprocess"))
    q128 = torch.randn(1, 1, 4, 128)
    launcher.attention_backward(torch.randn_like(q128), None, q128, q128, q128, q128, stats, None, 0.1, False, 0, 0,
                                False)
    assert launched == ["preprocess", "dkdv", "dq"]


def test_ragged_sizes_take_their_own_configs():
    """M or N not a multiple of 16 compiles as a separate Triton variant, where some tiles spill (the
    compiled-kernel report): the maps forward and the dK/dV with map gradients then take their own
    lists, and the autotuner's size key tells those calls apart from the aligned ones."""
    from lfi.backends.triton import interaction_attention as launcher

    pick = launcher._candidates
    assert _shape(pick("fwd", _named(maps=2))[0]) == (128, 128, 8, 2)
    assert _shape(pick("fwd", _named(maps=2, N=197))[0]) == (128, 128, 8, 1)
    assert _shape(pick("fwd", _named(N=197))[0]) == (128, 128, 8, 2)  # no maps: unchanged
    aligned = [_shape(c) for c in pick("dkdv", _named(HAS_DW=True))]
    for named in (_named(HAS_DW=True, M=197, N=197, GROUP=2), _named(HAS_DW=True, GROUP=2),
                  _named(HAS_DW=True, M=197, N=197, HAS_MASK=True)):
        assert [_shape(c) for c in pick("dkdv", named)] == [(32, 64, 4, 2), (32, 128, 8, 1)] != aligned
    for named in (_named(HAS_DW=True, M=197, N=197), _named(HAS_DW=True, M=64, N=200)):  # no GQA, KL, 2-D mask
        assert [_shape(c) for c in pick("dkdv", named)] == [(64, 64, 4, 1), (32, 64, 4, 2)] != aligned
    assert [launcher.size_key(n) for n in (16, 197, 208, 256, 577, 1024)] == [16, 255, 256, 256, 1023, 1024]


def test_heavy_calls_take_their_own_configs():
    """Forward, dK/dV and dQ lists by register demand (compiled-kernel report, sm_90, M = N = 197 and 1024,
    bf16 and fp16): the fused KL keeps its own list at every size, maps or not, and with grouped heads a
    smaller one (the KL's 32-row tiles spilled 4-292 B there; at D = 128 only 16x32 w8 held every
    combination); grouped heads with a 2-D mask stay on the GQA list (the plain D = 128 list spilled
    8-76 B); at D = 128 a 2-D mask, or map gradients, drop the plain list's unpipelined 32x128 tile
    (4-24 B with causal masking), and both together keep 16x128 only; the forward and dQ lists of the
    same sweep."""
    from lfi.backends.triton import interaction_attention as launcher

    def shapes(**named):
        return [_shape(c) for c in launcher._candidates("dkdv", _named(**named))]

    for extra in ({}, dict(HAS_DW=True), dict(HAS_DW=True, M=197, N=197), dict(IS_CAUSAL=True, HAS_MASK=True)):
        assert shapes(GROUP=2, HAS_KL=True, **extra) == [(16, 64, 4, 1), (16, 128, 8, 1)], extra
        assert shapes(D=128, GROUP=2, HAS_KL=True, **extra) == [(16, 32, 8, 1)], extra
    for extra in ({}, dict(HAS_DW=True), dict(M=197, N=197), dict(IS_CAUSAL=True, HAS_MASK=True)):
        assert shapes(HAS_KL=True, **extra) == [(32, 128, 8, 2), (32, 64, 4, 2)], extra
        assert shapes(D=128, HAS_KL=True, **extra) == [(16, 128, 8, 1), (16, 64, 8, 1)], extra
    # the fused KL with map gradients at ragged sizes: its own lists
    for ragged in (dict(M=197, N=197), dict(M=64, N=200, HAS_MASK=True, KEY_MASK=True)):
        assert shapes(HAS_KL=True, HAS_DW=True, **ragged) == [(32, 64, 4, 1), (32, 128, 8, 2)]
        assert shapes(D=128, HAS_KL=True, HAS_DW=True, **ragged) == [(16, 64, 8, 1)]
    for mask in (dict(HAS_MASK=True), dict(WRITE_DS=True, HAS_MASK=True)):
        assert shapes(D=128, GROUP=2, **mask) == [(16, 128, 8, 2)]
        assert shapes(D=128, **mask) == shapes(D=128, HAS_DW=True) == [(32, 128, 8, 2), (16, 128, 8, 2)]
        # with map gradients too: 32x128 spilled 12 B (fp16, bool mask, causal masking)
        assert shapes(D=128, HAS_DW=True, **mask) == [(16, 128, 8, 2)]
        assert shapes(HAS_DW=True, **mask) == shapes()
    assert shapes(D=128) == [(32, 128, 8, 2), (32, 128, 8, 1)]
    assert shapes(HAS_DW=True) == shapes(HAS_MASK=True) == shapes()  # D = 64: the plain list
    # the maps forward with a 2-D mask at D = 128: the pipelined 128x64 tile (64x64 w4 spilled 44-56 B,
    # fp16, M = N = 197)
    assert [_shape(c) for c in launcher._candidates("fwd", _named(D=128, maps=2, HAS_MASK=True))] == [
        (128, 64, 8, 3)]
    def fwd(**named):
        return [_shape(c) for c in launcher._candidates("fwd", _named(**named))]

    # the forward at D = 128 with the fused KL, or without maps with a 2-D mask at N not a multiple of
    # 16: 16-key tiles (128x64 / 64x64 / 64x32 spilled 4 B - 7 KB there, fp16 and bf16, N = 197)
    for named in (dict(HAS_KL=True), dict(HAS_KL=True, maps=1, N=197), dict(HAS_MASK=True, N=197),
                  dict(HAS_MASK=True, IS_CAUSAL=True, N=197), dict(HAS_KL=True, HAS_MASK=True)):
        assert fwd(D=128, **named) == [(128, 16, 8, 2), (64, 16, 4, 2)], named
    assert fwd(D=128, HAS_MASK=True)[0] == (128, 64, 8, 3)
    # without maps at N = 197 the 128x128 tile spilled 3.4-4 KB with a 2-D mask (D = 64) and 12 B with
    # a key-padding mask (D = 128)
    assert fwd(HAS_MASK=True, N=197) == fwd(D=128, HAS_MASK=True, KEY_MASK=True, N=197) == [(128, 64, 8, 3),
                                                                                           (64, 64, 4, 2)]
    assert fwd(HAS_MASK=True, KEY_MASK=True, N=197) == fwd(N=197)  # D = 64 key padding: the plain list
    # the fused KL at D = 64: with a 2-D mask 64x64 at 8 warps (174-234 registers; 128x64 / 128x32 /
    # 64x32 spilled 4-92 B with masks and causal masking at N = 197); without, 128x64 w8 s2 (s3 spilled
    # 8 B with a key-padding mask and causal masking) and 64x64 unpipelined (s2 16 B with a row window)
    assert fwd(HAS_KL=True, HAS_MASK=True) == fwd(HAS_KL=True, HAS_MASK=True, N=197) == [(64, 64, 8, 1),
                                                                                        (64, 64, 8, 2)]
    assert fwd(HAS_KL=True) == fwd(HAS_KL=True, HAS_MASK=True, KEY_MASK=True) == [(128, 64, 8, 2), (64, 64, 4, 1)]
    # dQ (compiled sweep, N = 197 and 1024): the fused KL at D = 128 and with a 2-D mask or its gradient
    # (128x64 spilled 8-736 B, 64x32 w4 4-56 B with map gradients and causal masking at N = 197), a
    # 2-D mask at D = 128 (128x32: 8 B, 64x32 w4 s2 8 B) and the D = 64 mask list's pipelined 128x64
    # (16 B with a float mask's gradient and causal masking)
    def dq(**named):
        return [_shape(c) for c in launcher._candidates("dq", _named(**named))]

    assert dq(D=128, HAS_KL=True) == dq(D=128, HAS_KL=True, WRITE_DS=True) == [(128, 16, 8, 2), (64, 16, 4, 2)]
    assert dq(HAS_KL=True, HAS_MASK=True) == dq(HAS_KL=True, WRITE_DS=True) == [(128, 32, 8, 2), (64, 64, 8, 1)]
    assert dq(HAS_KL=True) == dq()
    assert dq(D=128, HAS_MASK=True) == [(128, 16, 8, 2), (64, 32, 8, 2)]
    assert dq(HAS_MASK=True) == [(64, 64, 4, 3), (128, 64, 8, 1)]
    # the forward and dQ run per query head: grouping does not change their lists
    for kernel in ("fwd", "dq"):
        assert launcher._candidates(kernel, _named(GROUP=2, HAS_KL=True)) == launcher._candidates(
            kernel, _named(HAS_KL=True))


def test_float32_combinations_take_their_own_configs():
    """Float32 forward, TF32 dQ and dK/dV lists from the compiled sweep of feature combinations (sm_90, TF32 and exact
    float32, D = 64 and 128, M = N = 197 and 1024, every combination of causal masking, GQA, the fused
    KL, the mask kinds and maps): each list holds tiles that spilled in none of the combinations of
    its class, where the lists before spilled 4-796 B (RESULTS.md, "Float32 feature combinations")."""
    from lfi.backends.triton import interaction_attention as launcher

    def fwd(dtype_class="tf32", **named):
        exact = dict(precision="3xtf32") if dtype_class == "3xtf32" else {}
        return [_shape(c) for c in launcher._candidates("fwd", _named(torch.float32, **exact, **named))]

    mask_2d = dict(HAS_MASK=True)
    # TF32, D = 64: the maps forward's pipelined 128x64 spilled 16-48 B with causal masking or a 2-D
    # mask; without maps the fused KL's 128x32 w8 s2 4 B with key padding + causal masking, 88-272 B
    # with a 2-D mask (128x32 w8 s1 4-12 B at N = 197), where only 64x16 held every combination
    assert fwd(maps=2) == fwd(maps=2, IS_CAUSAL=True) == [(128, 64, 8, 1), (64, 64, 4, 1)]
    assert fwd(maps=2, **mask_2d) == fwd(maps=2, N=197) == [(128, 32, 8, 2), (64, 16, 4, 2)]
    assert fwd(**mask_2d) == fwd(N=197, **mask_2d) == [(128, 64, 8, 3), (64, 64, 4, 1)]
    assert fwd() == [(128, 64, 8, 3), (64, 64, 4, 2)]
    for named in ({}, dict(HAS_MASK=True, KEY_MASK=True), mask_2d):
        assert fwd(HAS_KL=True, **named) == [(64, 16, 4, 2)], named
    assert fwd(HAS_KL=True, maps=2) == fwd(HAS_KL=True, maps=2, **mask_2d) == [(128, 32, 8, 2), (64, 16, 4, 2)]
    # TF32, D = 128: the fused KL, and a 2-D mask with maps or at N not a multiple of 16, take 128x16 w8
    # (128x32 spilled 8-796 B there, 64x16 w4 4-140 B)
    for named in (dict(maps=2, **mask_2d), dict(N=197, **mask_2d), dict(HAS_KL=True), dict(HAS_KL=True, maps=2),
                  dict(HAS_KL=True, **mask_2d)):
        assert fwd(D=128, **named) == [(128, 16, 8, 2)], named
    assert fwd(D=128) == fwd(D=128, **mask_2d) == [(128, 32, 8, 2), (64, 16, 4, 2)]
    # exact float32 (3xTF32), D = 64: maps with causal masking spilled 12-16 B at 128x64 w8 s2 (s1
    # none at M = N = 1024; at ragged N 128x32 only), a 2-D mask without maps 4-64 B at 128x32 where N
    # is not a multiple of 16
    assert fwd("3xtf32", maps=2) == [(128, 64, 8, 1), (128, 32, 8, 2)]
    assert fwd("3xtf32", maps=2, N=197) == fwd("3xtf32", maps=2, **mask_2d) == [(128, 32, 8, 2)]
    assert fwd("3xtf32", N=197, **mask_2d) == [(128, 16, 8, 2)]
    assert fwd("3xtf32", **mask_2d) == [(128, 32, 8, 2)]
    assert fwd("3xtf32") == [(128, 64, 8, 2), (128, 32, 8, 2)]
    assert fwd("3xtf32", HAS_KL=True, **mask_2d) == fwd("3xtf32", HAS_KL=True) == [(64, 16, 4, 2)]
    # exact float32, D = 128 with maps: 128x16 w8 only, at every M (64x16 w4 spilled 60-316 B, 128x16
    # 4-24 B: no tile found without spills there)
    assert fwd("3xtf32", D=128, maps=2) == fwd("3xtf32", D=128, maps=2, M=16) == [(128, 16, 8, 2)]
    assert fwd("3xtf32", D=128) == [(64, 16, 4, 2)]
    # TF32 dQ at D = 64 with a 2-D mask, its gradient or the fused KL: 128x32 w8, 64x32 w4 (64x64 w4
    # spilled 28-192 B, 128x64 w8 4-276 B); the fused KL with a 2-D mask or its gradient 16-key tiles
    # (128x32 w8 s2 spilled 8-80 B there at N = 197, 64x32 w4 76-176 B)
    def dq(dtype_class="tf32", **named):
        exact = dict(precision="3xtf32") if dtype_class == "3xtf32" else {}
        return [_shape(c) for c in launcher._candidates("dq", _named(torch.float32, **exact, **named))]

    for named in (mask_2d, dict(WRITE_DS=True, **mask_2d), dict(HAS_KL=True)):
        assert dq(**named) == [(128, 32, 8, 2), (64, 32, 4, 2)], named
    assert dq(HAS_KL=True, **mask_2d) == dq(HAS_KL=True, WRITE_DS=True) == [(128, 16, 8, 2), (64, 16, 4, 2)]
    assert dq() == dq(HAS_MASK=True, KEY_MASK=True) == [(128, 64, 8, 2), (64, 64, 4, 2)]
    # exact float32 dQ at D = 64: 128x32 w8 s2 spilled 4-28 B with a 2-D mask (or its gradient) and
    # causal masking without a map gradient, 4-308 B with the fused KL too; 64x16 w4 s2 held the mask
    # alone (88-104 B with the KL); with a map gradient and no KL 128x32 did not spill
    assert dq("3xtf32", **mask_2d) == dq("3xtf32", WRITE_DS=True) == [(128, 16, 8, 2), (64, 16, 4, 2)]
    for named in (mask_2d, dict(WRITE_DS=True), dict(HAS_DW=True, **mask_2d), dict(HAS_DW=True, WRITE_DS=True)):
        assert dq("3xtf32", HAS_KL=True, **named) == [(128, 16, 8, 2)], named
    assert dq("3xtf32") == dq("3xtf32", HAS_KL=True) == dq("3xtf32", HAS_MASK=True, KEY_MASK=True) == dq(
        "3xtf32", HAS_DW=True, **mask_2d) == [(128, 32, 8, 2)]
    # TF32 dQ at D = 128: the fused KL with a 2-D mask, and without a map gradient the KL or a 2-D mask,
    # 128x16 w8 s2 (the generic 128x32 w8 s2 spilled 4-312 B there, 64x16 w4 s2 8-56 B); with a map
    # gradient and only one of them the generic list, which did not spill
    for named in (dict(HAS_KL=True), dict(HAS_KL=True, **mask_2d), dict(HAS_KL=True, HAS_DW=True, WRITE_DS=True),
                  mask_2d, dict(WRITE_DS=True)):
        assert dq(D=128, **named) == [(128, 16, 8, 2)], named
    assert dq(D=128) == dq(D=128, HAS_DW=True, **mask_2d) == dq(D=128, HAS_DW=True, HAS_KL=True) == [
        (128, 32, 8, 2), (64, 16, 4, 2)]
    # the forward's lists for the fused KL with a 2-D mask are the plain KL's, in float32 as before
    for dtype_class, D, maps in itertools.product(("tf32", "3xtf32"), (64, 128), (0, 2)):
        assert fwd(dtype_class, D=D, maps=maps, HAS_KL=True, **mask_2d) == fwd(dtype_class, D=D, maps=maps,
                                                                                HAS_KL=True)
    # exact float32 preprocess at D = 128: 64x32 w4 s2 (64x64 w4 s2 spilled 16-52 B with map gradients
    # and a 2-D mask)
    assert [_shape(c) for c in launcher._candidates("preprocess", _named(torch.float32, 128, precision="3xtf32",
                                                                         HAS_DW=True, **mask_2d))] == [(64, 32, 4, 2)]
    # TF32 dK/dV at D = 64 (32x64 w4 spilled 8-792 B, 32x128 w8 s2 12-660 B with grouped heads, the
    # fused KL or map gradients with a 2-D mask): 16-row tiles for the KL and for map gradients with
    # grouped heads or at ragged sizes with a mask, the pipelined 32x128 first with grouped heads alone
    def dkdv(**named):
        return [_shape(c) for c in launcher._candidates("dkdv", _named(torch.float32, **named))]

    for named in (dict(HAS_KL=True), dict(HAS_KL=True, HAS_DW=True, M=197, N=197), dict(HAS_KL=True, IS_CAUSAL=True)):
        assert dkdv(**named) == [(16, 128, 8, 1), (16, 64, 4, 1)], named
    assert dkdv(HAS_KL=True, GROUP=2) == dkdv(HAS_KL=True, GROUP=2, HAS_DW=True) == [(16, 64, 4, 1), (16, 128, 8, 1)]
    assert dkdv(GROUP=2) == dkdv(GROUP=2, **mask_2d) == [(32, 128, 8, 2), (16, 128, 8, 1)]
    assert dkdv(GROUP=2, HAS_DW=True) == dkdv(HAS_DW=True, M=197, N=197, **mask_2d) == [(16, 128, 8, 1),
                                                                                      (16, 64, 4, 1)]
    assert dkdv(HAS_DW=True, **mask_2d) == [(32, 128, 8, 2), (32, 128, 8, 1)]
    assert dkdv() == dkdv(HAS_DW=True) == dkdv(**mask_2d) == [(32, 128, 8, 2), (32, 64, 4, 2)]


@pytest.mark.parametrize("dtype, D, copied", [(torch.float32, 16, True), (torch.bfloat16, 80, True),
                                               (torch.bfloat16, 64, False), (torch.float16, 16, False)],
                         ids=["fp32", "bf16_D80", "bf16_D64", "fp16_D16"])
def test_unaligned_map_gradient(monkeypatch, dtype, D, copied):
    """A dW whose rows are not 16-element aligned is copied into the maps' padded layout, except for
    16-bit inputs at head dims <= 64, where the kernels read it in place (compiled-code report: no
    spills there, and the copy costs more than the unaligned loads); the gradients are those of an
    aligned copy either way, bit for bit."""
    from lfi.backends.triton import interaction_attention as launcher

    seen = []
    original = launcher._preprocess

    def spy(grid, *args, **constexprs):
        g = args[7]  # the dW (or dO) argument of the preprocess kernel
        seen.append((g.stride(-2), g.shape[-1]))
        return original(grid, *args, **constexprs)

    monkeypatch.setattr(launcher, "_preprocess", spy)
    gen = make_gen("unaligned_dw", str(dtype), D)
    q, k, v = make_qkv(1, 2, 2, 9, 19, D, dtype=dtype, gen=gen)
    stats = launcher.attention_forward(q, k, v, None, 0.25, False, 0, 9)
    out, st, w = stats[0], stats[1], stats[2]
    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    dw = torch.randn(1, 2, 9, 19, generator=gen).to(w.device, w.dtype)
    got = launcher.attention_backward(dout, dw, q, k, v, out, st, None, 0.25, False, 0, 9, False)
    padded = launcher._map_buffer(1, 2, 9, 19, dw.dtype, dw.device).copy_(dw)
    want = launcher.attention_backward(dout, padded, q, k, v, out, st, None, 0.25, False, 0, 9, False)
    assert seen == [(32, 19) if copied else (19, 19), (32, 19)]
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a strided last dim (an expanded gradient, as w.sum() gives) is always copied
    seen.clear()
    launcher.attention_backward(dout, dw[..., :1].expand(dw.shape), q, k, v, out, st, None, 0.25, False, 0, 9, False)
    assert seen == [(32, 19)]


def test_autotune_env_and_buckets(monkeypatch):
    from lfi.backends.triton._launch import autotune_enabled
    from lfi.backends.triton._launch import bucket

    assert [bucket(n) for n in (1, 16, 17, 197, 256, 257)] == [16, 16, 32, 256, 256, 512]
    monkeypatch.setenv("LFI_AUTOTUNE", "0")
    assert not autotune_enabled()
    monkeypatch.setenv("LFI_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="LFI_AUTOTUNE"):
        autotune_enabled()
