"""The one place that decides which backend runs an op.

Backends:
  "torch"  -- the PyTorch reference (lfi.backends.torch), any device and dtype, row-chunked.
  "triton" -- Triton kernels (lfi.backends.triton): CUDA tensors, or CPU tensors when the
              interpreter was enabled (TRITON_INTERPRET=1 before lfi.kernels was imported).
  "cuda"   -- the C++/CUDA extension lfi_C (lfi.backends.cuda): CUDA kernels, and CPU kernels for CPU
              tensors; JIT-built with ninja on first explicit use unless built ahead of time.
"auto" picks triton for CUDA tensors when Triton works, else the cuda extension when it is already
built (never compiles it), else torch; the environment variable LFI_BACKEND overrides "auto".

Before that, routes_to_sdpa() decides whether an interaction_attention call on "auto" asks for nothing
that only our kernels give (maps, KL, our fully-masked-row semantics) and so runs
F.scaled_dot_product_attention instead.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lfi.backends.cuda import _ext as _cuda_ext  # cheap: probes PATH once, builds nothing

BACKENDS = ("torch", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS


def _probe_triton() -> tuple[str | None, bool]:
    """(why Triton is unusable or None, whether its kernels run under the CPU interpreter).

    Probed once at import, so that dispatch is plain Python that torch.compile traces without
    breaking the graph. TRITON_INTERPRET=1 must therefore be set before lfi is imported.
    """
    try:
        from lfi import kernels
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return f"triton unavailable: {type(exc).__name__}: {exc}", False
    return None, kernels.INTERPRET


TRITON_ERROR, TRITON_INTERPRET = _probe_triton()


def _probe_sdpa_gqa() -> bool:
    """Whether the installed torch's F.scaled_dot_product_attention takes enable_gqa (torch >= 2.5).

    Probed once at import with a tiny CPU call, like Triton above, so that routes_to_sdpa stays plain
    Python on constants."""
    try:
        kv = torch.zeros(1, 1, 1, 8)
        F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 8), kv, kv, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


SDPA_GQA = _probe_sdpa_gqa()


def _unusable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else why not."""
    if backend == "torch":
        return None
    if backend == "cuda":
        return _cuda_ext.unusable_reason(device)
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if device.type == "cuda":
        if TRITON_INTERPRET:
            return "TRITON_INTERPRET=1 is set: Triton runs on CPU tensors only"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu":
        if TRITON_INTERPRET:
            return None
        return "CPU tensors need TRITON_INTERPRET=1 set before lfi is imported"
    return f"no Triton support for device type {device.type!r}"


def backend_status(device: torch.device | str) -> dict[str, tuple[bool, str]]:
    """Maps each backend name to (usable on `device`, reason)."""
    device = torch.device(device)
    described = {
        "torch": "PyTorch reference, any device",
        "triton": (
            "Triton interpreter (TRITON_INTERPRET=1): correct but slow"
            if device.type == "cpu"
            else f"Triton kernels on {torch.cuda.get_device_name(device) if torch.cuda.is_available() else device}"
        ),
        # One backend name, two builds: on CPU tensors "cuda" runs the extension's C++ host kernels.
        "cuda": ("lfi_C extension, C++ CPU kernels (multithreaded; the host build of backend='cuda'), "
                 "built on first use" if device.type == "cpu" else
                 "lfi_C extension, CUDA kernels, built on first use"),
    }
    status = {}
    for name in BACKENDS:
        reason = _unusable_reason(name, device)
        status[name] = (reason is None, described[name] if reason is None else reason)
    return status


def auto_choice(device: torch.device | str) -> tuple[str, str]:
    """(the backend "auto" runs on `device`, why) — the rule of resolve("auto", ...), with its reason
    spelled out for `lfi info`."""
    device = torch.device(device)
    env = env_backend()
    if env != "auto":
        return env, f"LFI_BACKEND={env}"
    if device.type == "cuda":
        if _unusable_reason("triton", device) is None:
            return "triton", "CUDA tensors and Triton works: the fused Triton kernels"
        if _cuda_ext_ready():
            return "cuda", (f"Triton cannot run ({_unusable_reason('triton', device)}); the lfi_C extension is "
                            "built: its CUDA kernels")
        return "torch", (f"Triton cannot run ({_unusable_reason('triton', device)}) and the lfi_C extension is not "
                         "built (auto never compiles it): the PyTorch reference")
    return "torch", ("not a CUDA device: the PyTorch reference (auto never picks the Triton interpreter or the "
                     "extension's C++ host build, which are for tests and explicit use)")


def resolve(backend: str, device: torch.device) -> str:
    """Returns the concrete backend name for a request on `device`, or raises ValueError."""
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        backend = env_backend()
        if backend == "auto":
            return auto_choice(device)[0]
    reason = _unusable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run on {device}: {reason}")
    return backend


def env_backend() -> str:
    """LFI_BACKEND (unset or empty: "auto"), the backend that backend="auto" stands for."""
    backend = os.environ.get("LFI_BACKEND", "auto") or "auto"
    if backend not in CHOICES:
        raise ValueError(f"LFI_BACKEND must be one of {CHOICES}, got {backend!r}")
    return backend


def routes_to_sdpa(backend: str, device: torch.device, *, need_weights: bool, kl_target: bool,
                   attn_mask: bool, is_causal: bool, M: int, N: int, H: int, Hkv: int) -> bool:
    """Whether interaction_attention runs F.scaled_dot_product_attention instead of our kernels.

    True exactly when SDPA computes what the call asks for, with the same semantics, so a patched
    model pays nothing where no maps are wanted:
      * backend="auto", with LFI_BACKEND unset or "auto" (an explicit backend, by argument or by
        LFI_BACKEND, always runs our kernels);
      * CPU or CUDA tensors;
      * no maps (need_weights=False) and no kl_target: SDPA returns neither;
      * no attn_mask: a row with every key masked gives zeros (and zero gradients) with us, and
        with SDPA whatever the kernel it picks gives (NaN in some);
      * is_causal only with M == N (square causal masks; non-square ones stay on our kernels);
      * grouped-query heads (H != Hkv) only where SDPA takes enable_gqa (torch >= 2.5).
    dropout_p is no condition: SDPA applies dropout itself (fused where its backend can).

    Plain Python on arguments that are static under torch.compile (no tensor data is read); the
    arguments are booleans and sizes so that the rule reads on one screen.
    """
    if backend != "auto" or env_backend() != "auto":
        return False
    if device.type not in ("cpu", "cuda"):
        return False
    if need_weights or kl_target or attn_mask:
        return False
    if is_causal and M != N:
        return False
    return H == Hkv or SDPA_GQA


def _cuda_ext_ready() -> bool:
    """The cuda extension is already built and loadable for CUDA tensors ("auto" never JIT-builds)."""
    return torch.cuda.is_available() and _cuda_ext.ready_for_cuda()


# ------------------------------------------------------------------------------------------------
# The op table: per op, the module implementing it on each backend, imported here (about 20 ms) so
# that "go to definition" follows plain imports from lfi.ops to every backend's kernels. A backend
# whose import fails (Triton missing or broken) has None and its reason in TRITON_ERROR.
# ------------------------------------------------------------------------------------------------
from lfi.backends.cuda import attention_kl as cuda_attention_kl  # noqa: E402
from lfi.backends.cuda import attention_kl_qk as cuda_attention_kl_qk  # noqa: E402
from lfi.backends.cuda import interaction_attention as cuda_interaction_attention  # noqa: E402
from lfi.backends.torch import attention_kl as torch_attention_kl  # noqa: E402
from lfi.backends.torch import attention_kl_qk as torch_attention_kl_qk  # noqa: E402
from lfi.backends.torch import interaction_attention as torch_interaction_attention  # noqa: E402

triton_attention_kl = triton_attention_kl_qk = triton_interaction_attention = None
if TRITON_ERROR is None:
    from lfi.backends.triton import attention_kl as triton_attention_kl  # noqa: E402
    from lfi.backends.triton import attention_kl_qk as triton_attention_kl_qk  # noqa: E402
    from lfi.backends.triton import interaction_attention as triton_interaction_attention  # noqa: E402

OPS = {
    "interaction_attention": {"torch": torch_interaction_attention, "triton": triton_interaction_attention,
                              "cuda": cuda_interaction_attention},
    "attention_kl": {"torch": torch_attention_kl, "triton": triton_attention_kl, "cuda": cuda_attention_kl},
    "attention_kl_qk": {"torch": torch_attention_kl_qk, "triton": triton_attention_kl_qk,
                        "cuda": cuda_attention_kl_qk},
}


def implementation(backend: str, op: str):
    """The module implementing `op` on the concrete `backend` (one resolve() returned), e.g.
    lfi.backends.triton.interaction_attention."""
    impl = OPS[op][backend]
    if impl is None:  # resolve() refuses an unusable backend first; this guards direct callers
        raise ValueError(f"backend={backend!r} is unavailable: {_unusable_reason(backend, torch.device('cpu'))}")
    return impl
