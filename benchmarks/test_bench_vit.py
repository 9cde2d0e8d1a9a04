"""Whole-model benchmark: timm ViT-B/16 with attention maps, lfi-patched vs timm.

Implementations (one model, reconfigured per case):

* ``timm_sdpa``  timm's default fused path (``F.scaled_dot_product_attention``): no maps possible.
* ``timm_eager`` timm's non-fused path (``fused_attn=False``); maps via forward hooks on
  ``attn_drop`` (what ``timm.utils.AttentionExtract(method="hook")`` does).
* ``lfi``        ``lfi.integrations.timm.patch(model)``; maps via ``lfi.capture_attention``.

Maps: ``none``; ``last_cls`` (CLS row of the last layer, lfi only: the op computes just that row);
``last`` (full last-layer maps); ``all`` (full maps of all 12 layers). In ``fwd+bwd`` the maps enter
the loss (``logits² + mean(maps²)``), so gradients flow through them as in LFI training.

CUDA: B=32, bf16 weights and inputs (lfi backend "auto" = Triton). CPU: B=2, fp32, 3 rounds (lfi
backend "auto" = torch reference). Override the batch with LFI_BENCH_VIT_BATCH and the rounds with
--lfi-min-rounds/--lfi-max-rounds. Peak memory (``lfi.benchmark.measure_peak_memory``: CUDA
max_memory_allocated over the step minus memory allocated before; CPU peak RSS delta) goes to
``extra_info``.

Run: ``pytest benchmarks/test_bench_vit.py --benchmark-only``
"""
from __future__ import annotations

import os

import pytest
import torch

from lfi import benchmark as bench

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402

import lfi  # noqa: E402
import lfi.integrations.timm as lfi_timm  # noqa: E402
from lfi import _dispatch  # noqa: E402

MODEL = "vit_base_patch16_224"
CASES = [
    ("timm_sdpa", "none"),
    ("timm_eager", "none"),
    ("timm_eager", "last"),
    ("timm_eager", "all"),
    ("lfi", "none"),
    ("lfi", "last_cls"),
    ("lfi", "last"),
    ("lfi", "all"),
]


@pytest.fixture(scope="module")
def vit(bench_config):
    device = bench_config.device
    dtype = bench_config.dtype
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).to(device=device, dtype=dtype)
    B = int(os.environ.get("LFI_BENCH_VIT_BATCH", 32 if device.type == "cuda" else 2))
    x = torch.randn(B, 3, 224, 224, device=device, dtype=dtype)
    yield model, x
    del model, x
    bench.free_memory(device)


def _configure(model, impl: str):
    """Puts `model` in the state of `impl` (and returns a function that undoes it)."""
    lfi_timm.unpatch(model)
    attns = [m for m in model.modules() if type(m) is Attention]
    fused = [m.fused_attn for m in attns]
    if impl == "timm_eager":
        for m in attns:
            m.fused_attn = False
    elif impl == "timm_sdpa":
        for m in attns:
            m.fused_attn = True
    elif impl == "lfi":
        lfi_timm.patch(model)  # backend "auto" (LFI_BACKEND overrides)

    def restore():
        lfi_timm.unpatch(model)
        for m, f in zip(attns, fused):
            m.fused_attn = f

    return restore


def _layers(model, maps: str):
    n = len(model.blocks)
    return {"none": [], "last_cls": [n - 1], "last": [n - 1], "all": list(range(n))}[maps]


def _make_step(model, x, impl: str, mode: str, maps: str):
    layers = _layers(model, maps)
    store: dict = {}

    def run_model():
        """logits and the list of captured maps."""
        if impl == "lfi" and layers:
            rows = slice(0, 1) if maps == "last_cls" else None
            with lfi.capture_attention(model, layers=layers, rows=rows, grad=mode != "fwd") as cap:
                logits = model(x)
            return logits, list(cap.values())
        store.clear()
        logits = model(x)
        return logits, [store[i] for i in layers]

    hooks = []
    if impl == "timm_eager":
        for i in layers:
            hooks.append(model.blocks[i].attn.attn_drop.register_forward_hook(
                lambda m, a, out, i=i: store.__setitem__(i, out)))

    if mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad():
                logits, captured = run_model()
            return logits, captured
    else:
        model.train()  # ViT-B/16 has no dropout by default: same math as eval

        def step():
            model.zero_grad(set_to_none=True)
            logits, captured = run_model()
            loss = logits.float().square().mean()
            for a in captured:
                loss = loss + a.float().square().mean()
            loss.backward()
            return loss.detach()

    def release():
        for h in hooks:
            h.remove()
        store.clear()
        model.zero_grad(set_to_none=True)

    return step, release


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("impl,maps", CASES, ids=[f"{i}-{m}" for i, m in CASES])
def test_vit_b16(benchmark, bench_config, vit, impl, maps, mode):
    c = bench_config
    model, x = vit
    device = c.device
    benchmark.group = f"{MODEL} B={x.shape[0]} {bench.dtype_name(c.dtype)} {mode}"
    restore = _configure(model, impl)
    step, release = _make_step(model, x, impl, mode, maps)
    try:
        try:
            step()  # warm-up: autotuning, lazy initialization
            t_once = bench.time_once_s(step, device)
            _, peak = bench.measure_peak_memory(step, device)
        except Exception as e:
            if bench.is_oom(e):
                pytest.skip(f"out of memory: {type(e).__name__}")
            raise
        rounds = int(max(c.min_rounds, min(c.max_rounds, c.target_time / max(t_once, 1e-6))))
        if device.type == "cpu":
            rounds = min(rounds, c.min_rounds)  # a ViT-B step takes seconds on CPU: few rounds
        n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        layers = _layers(model, maps)
        map_rows = 1 if maps == "last_cls" else n_tokens
        B, H, D = x.shape[0], model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
        one_map_mib = B * H * n_tokens * n_tokens * x.element_size() / 2**20
        lfi_backend = _dispatch.resolve("auto", device) if impl == "lfi" else None
        # impl / maps / shape / label follow the keys benchmarks/summarize.py tabulates
        # (impl "eager" is its speed and memory reference for the same (mode, maps))
        summary_impl = {"timm_sdpa": "sdpa", "timm_eager": "eager"}.get(impl, f"lfi_{lfi_backend}")
        label = {"timm_sdpa": "timm fused (SDPA)", "timm_eager": "timm eager + attn_drop hooks"}.get(
            impl, f"lfi patch + capture_attention ({lfi_backend})")
        benchmark.extra_info.update(
            model=MODEL, vit_impl=impl, vit_maps=maps, impl=summary_impl,
            maps="" if maps == "none" else maps, label=f"{label} [maps: {maps}]",
            shape=f"{MODEL} (whole model)", kind="self", mode=mode, B=B, H=H, M=n_tokens, N=n_tokens, D=D,
            layers_captured=len(layers), map_mib=one_map_mib,
            captured_map_mib=len(layers) * B * H * map_rows * n_tokens * x.element_size() / 2**20,
            dtype=bench.dtype_name(c.dtype), device=str(device), device_name=c.device_name,
            torch_threads=torch.get_num_threads(), loadavg_1m=round(os.getloadavg()[0], 2),
            lfi_backend=lfi_backend,
            peak_mem_bytes=peak,
            peak_mem_mib=None if peak is None else round(peak / 2**20, 2),
            mem_method="cuda max_memory_allocated - allocated before" if device.type == "cuda"
            else "peak RSS (VmHWM after clear_refs) - RSS before",
            first_call_s=round(t_once, 6), rounds=rounds,
            **{f"version_{k.split()[0]}": v for k, v in c.versions.items()},
            version_timm=timm.__version__,
        )

        def run():
            step()
            bench.synchronize(device)

        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    finally:
        release()
        restore()
        bench.free_memory(device)
