"""import-torchvision through the real weights-loading code, and a 2-process gloo run."""

from __future__ import annotations

import json
import time

import torch
from torchvision.models import resnet18

from models import checkpoint
from models.architectures import cached_weights_path, imagenet_categories, imagenet_weights
from tests.torchrun_helpers import torchrun_fit
from training.cli import main


def test_import_torchvision_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = resnet18(num_classes=1000).eval()
    path = cached_weights_path(imagenet_weights("resnet18"))
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    out = tmp_path / "imagenet-resnet18"
    assert main(["import-torchvision", "--arch", "resnet18", "--output", str(out)]) == 0
    model, card = checkpoint.load(out)
    assert card.classes == imagenet_categories("resnet18") and len(card.classes) == 1000
    assert (card.preprocessing.resize, card.preprocessing.crop) == (256, 224)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_import_torchvision_without_weights_fails_at_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    start = time.monotonic()
    code = main(["import-torchvision", "--arch", "resnet18", "--output", str(tmp_path / "o")])
    assert code == 1 and time.monotonic() - start < 30
    err = caplog.text
    assert "resnet18-f37072fd.pth" in err and "--weights none" in err
    assert not (tmp_path / "o" / "card.json").exists()


def test_torchrun_two_cpu_processes(single_data, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun_fit(single_data, out, "--val-fraction", "0.25")
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = checkpoint.read_card(out)
    assert card.training["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    # 9 validation images over 2 ranks pads to 10; the metrics must count 9.
    assert metrics["num_samples"] == 9 == card.training["dataset"]["val"]
    assert sum(metrics["per_class"][c]["support"] for c in card.classes) == 9
    assert proc.stderr.count("saved checkpoint") == 2  # one rank writes (best epoch + final)
    # Each rank saved its own random streams; the loaders' differ (one augmentation stream
    # per rank, not the same one on every rank).
    rng = torch.load(out / "last.pt", weights_only=True)["rng"]
    assert len(rng) == 2
    assert not torch.equal(rng[0]["loader"], rng[1]["loader"])
    assert not torch.equal(rng[0]["process"]["torch"], rng[1]["process"]["torch"])


def test_torchrun_with_an_undecodable_image_on_one_rank(tmp_path):
    from PIL import Image

    from training.commands.synth import generate
    from training.config import SynthConfig

    data = generate(SynthConfig(out=tmp_path / "train", size=32, per_class=4, classes=2, seed=5))
    val = generate(SynthConfig(out=tmp_path / "val", size=32, per_class=2, classes=2, seed=6))
    for name in ("circle", "square"):
        broken = data / name / "broken.png"
        Image.effect_noise((32, 32), 60).convert("RGB").save(broken)
        broken.write_bytes(broken.read_bytes()[:200])  # header fine, pixels cut short
    out = tmp_path / "ddp"
    # One image per step: a rank whose image fails has an empty batch while the other trains.
    proc = torchrun_fit(data, out, "--val", str(val), batch_size=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = checkpoint.read_card(out).training["dataset"]["skipped"]
    assert skipped["train_undecodable"] == 2 and skipped["val_undecodable"] == 0
