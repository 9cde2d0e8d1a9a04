"""`lfi demo --quick` through lfi.train.cli.main, and the experiment's metrics."""
import json

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("matplotlib")

from lfi.train.cli import main  # noqa: E402
from lfi.train.demo import ARMS  # noqa: E402
from lfi.train.demo import cls_attention  # noqa: E402
from lfi.train.demo import curve_auc  # noqa: E402
from lfi.train.demo import epochs_to_target  # noqa: E402
from lfi.train.demo import summarize  # noqa: E402


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "leak check" in text and "headline" in text
    for arm in ARMS:
        assert arm in text, arm
    for name in ("table.md", "results.json", "accuracy.png", "maps.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]["main"]) == set(ARMS) | {"target"}
    for arm in ARMS:
        s = res["summary"]["main"][arm]
        assert len(s["curves"]) == 1 and len(s["curves"][0]) == res["config"]["epochs"]
        assert 0 <= s["cls_mass"][0] <= 1 and 0 <= s["textured"][0] <= 1
    assert 0 <= res["leak"]["colour"]["best"] <= 1
    md = (out / "table.md").read_text()
    assert "Leak check" in md and "| arm |" in md and "Headline" in md
    # the seed-0 checkpoints are usable by lfi eval
    assert (out / "lfi_seed0" / "checkpoint.safetensors").is_file()


def test_demo_metrics():
    assert epochs_to_target([0.2, 0.5, 0.7, 0.6], 0.6) == 3
    assert epochs_to_target([0.2, 0.5], 0.6) is None
    assert curve_auc([0.25, 0.5, 0.75]) == pytest.approx(0.5)
    run = lambda accs, t=1.0: dict(history=[dict(val_acc=a) for a in accs], time=t,  # noqa: E731
                                   shift=dict(textured=0.5, noisy=0.4), cls_mass=0.3, cls_chance=0.1)
    res = {"plain ViT": [run([0.3, 0.6, 0.8]), run([0.3, 0.5, 0.6])],
           "LFI": [run([0.5, 0.7, 0.7]), run([0.2, 0.3, 0.4])]}
    s = summarize(res, 3)
    assert s["target"] == pytest.approx(0.9 * 0.7)
    assert s["plain ViT"]["epochs_to_target"] == [3, None] and s["plain ViT"]["median_epochs"] == 3.5
    assert s["LFI"]["epochs_to_target"] == [2, None]
    assert s["LFI"]["final"][0] == pytest.approx(0.55) and s["LFI"]["auc"][0] == pytest.approx(0.4666667)


def test_cls_attention_measures_the_models_own_attention():
    from lfi.models import InteractionViT

    torch.manual_seed(0)
    m = InteractionViT("vit_tiny_patch16_224", num_queries=2, img_size=32, patch_size=4, embed_dim=32, depth=2,
                       num_heads=2, num_classes=4).eval()
    x = torch.randn(3, 3, 32, 32)
    masks = torch.zeros(3, 32, 32)
    masks[:, :8, :8] = 1  # 4 of 64 patches
    mass, chance, maps = cls_attention(m, x, masks, m.grid)
    assert chance == pytest.approx(4 / 64) and maps.shape == (3, 8, 8)
    torch.testing.assert_close(maps.flatten(1).sum(-1), torch.ones(3))
    # independent reference: timm's own (unfused) attention probabilities of the last block
    blk = m.vit.blocks[-1]
    blk.attn.fused_attn = False
    seen = {}
    hook = blk.attn.attn_drop.register_forward_hook(lambda mod, a, o: seen.__setitem__("p", a[0]))
    with torch.no_grad():
        m(x)
    hook.remove()
    p = seen["p"][:, :, 0, 1:]  # CLS row, patch columns
    p = p / p.sum(-1, keepdim=True)
    obj = torch.zeros(64)
    obj[[0, 1, 8, 9]] = 1
    per_head = (p * obj).sum(-1).mean(0)
    assert mass == pytest.approx(float(per_head.max()), abs=1e-5)
    torch.testing.assert_close(maps.flatten(1), p[:, int(per_head.argmax())], rtol=1e-4, atol=1e-6)
