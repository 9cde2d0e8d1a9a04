"""`lfi info`: which backend "auto" runs on each device, and why (the rule of lfi._dispatch.resolve)."""
import pytest
import torch

from lfi import _dispatch
from lfi import cli as lfi_cli


def test_info_names_the_auto_backend_and_why(capsys):
    assert lfi_cli.main(["info", "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert 'backend="auto" runs: torch (not a CUDA device' in out
    for name in _dispatch.BACKENDS:
        assert f"│ {name} " in out


@pytest.mark.parametrize("triton_ok, ext_ready, expected", [
    (True, True, "triton"), (True, False, "triton"), (False, True, "cuda"), (False, False, "torch")])
def test_auto_choice_on_cuda_tensors(monkeypatch, triton_ok, ext_ready, expected):
    monkeypatch.delenv("LFI_BACKEND", raising=False)
    real = _dispatch._unusable_reason
    monkeypatch.setattr(_dispatch, "_unusable_reason",
                        lambda b, d: (None if triton_ok else "no driver") if b == "triton" else real(b, d))
    monkeypatch.setattr(_dispatch, "_cuda_ext_ready", lambda: ext_ready)
    picked, why = _dispatch.auto_choice("cuda")
    assert picked == expected and picked == _dispatch.resolve("auto", torch.device("cuda"))
    assert ("no driver" in why) == (not triton_ok)
    if expected == "torch":
        assert "not built" in why and "never compiles" in why


def test_auto_choice_follows_lfi_backend(monkeypatch):
    monkeypatch.setenv("LFI_BACKEND", "torch")
    assert _dispatch.auto_choice("cpu") == ("torch", "LFI_BACKEND=torch")
    monkeypatch.setenv("LFI_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LFI_BACKEND must be one of"):
        _dispatch.auto_choice("cpu")
