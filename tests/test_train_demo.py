"""`lfi demo --quick` through lfi.train.cli.main: runs and prints the table."""
import json

import pytest

pytest.importorskip("timm")
pytest.importorskip("matplotlib")

from lfi.train.cli import main  # noqa: E402


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "validation accuracy" in text and "summary" in text and "convergence speedup" in text
    assert "baseline" in text and "LFI" in text and "epochs to target" in text
    for name in ("table.md", "results.json", "accuracy.png", "maps.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert len(res["curves"]["baseline"][0]) == len(res["curves"]["LFI"][0]) == res["config"]["epochs"]
    assert "| epoch |" in (out / "table.md").read_text()
