"""Shared pytest setup for the lfi test suite.

Without a GPU, Triton kernels can only run under the CPU interpreter, which must be switched on
*before* any ``@triton.jit`` function is defined, i.e. before ``lfi`` (or ``triton``) is imported.
This file is loaded by pytest before any test module, so the variable is set here.
"""
import os
import tempfile
import warnings

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# A fresh inductor cache per run: compiled graphs cached by an earlier version of the custom ops
# could otherwise be reused against the current fake kernels.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lfi-inductor-"))

import pytest  # noqa: E402

from helpers import BACKEND_PARAMS  # noqa: E402
from helpers import BACKEND_SKIP  # noqa: E402
from helpers import BACKENDS  # noqa: E402
from helpers import DEVICE  # noqa: E402
from helpers import HAS_CUDA  # noqa: E402
from helpers import INTERPRETER_NOISE  # noqa: E402
from helpers import TINY_CLIP  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    # numpy's warnings from the Triton CPU interpreter's masked-off lanes (helpers.INTERPRETER_NOISE),
    # for every test that reaches a Triton kernel, in one place.
    config.addinivalue_line("filterwarnings", INTERPRETER_NOISE)


def pytest_report_header(config):
    return [
        f"lfi tests: device={DEVICE}, backends={BACKENDS}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    ] + [f"lfi tests: backend {name!r} skipped: {reason}" for name, reason in BACKEND_SKIP.items()]


def pytest_runtest_logreport(report):
    """LFI_TEST_FAILURE_LOG=PATH: each failure's traceback appended to PATH as soon as it happens
    (benchmarks/gpu_check.sh: a run cut short by its time limit still says what failed and why).
    Under xdist only the controller writes, so each failure is written once."""
    path = os.environ.get("LFI_TEST_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext[-3000:]}\n")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """cuda when available, else cpu."""
    return DEVICE


@pytest.fixture(scope="session")
def backends() -> list:
    """Backends usable on `device`: torch always; triton when it can run (GPU or interpreter); cuda
    when the lfi_C extension is built or can be built here (helpers.BACKEND_SKIP says why not)."""
    return list(BACKENDS)


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request) -> str:
    """The backend axis of the shared matrix (torch, triton, cuda; skipped with a reason where a
    backend cannot run here)."""
    return request.param


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def tiny_clip():
    """A random tiny open_clip CLIP (helpers.TINY_CLIP, seed 0), in eval mode (skipped without
    open_clip)."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # open_clip warns about the random (non-pretrained) weights
        return open_clip.create_model("ViT-S-16", pretrained=None, **TINY_CLIP).eval()


@pytest.fixture(scope="module")
def clip_weights(tiny_clip, tmp_path_factory):
    """`tiny_clip`'s weights in a safetensors file, for the teachers that load a local file."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, str(path))
    return path
