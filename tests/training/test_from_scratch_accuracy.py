"""Training from scratch learns: synthetic shapes, resnet18 at 32 px, to high accuracy.

A file of its own: the suite's longest fit, so pytest-xdist can run it beside the others.
"""

from __future__ import annotations

import json

import pytest

from training.cli import main


@pytest.mark.slow
def test_from_scratch_on_synthetic_shapes_reaches_high_accuracy(tmp_path):
    from training.commands.synth import generate
    from training.config import SynthConfig

    data = generate(SynthConfig(out=tmp_path / "shapes", task="single", size=32, per_class=300,
                                classes=4, seed=11))
    out = tmp_path / "shapes-ckpt"
    code = main(["fit", str(data), "--output", str(out), "--weights", "none", "--arch",
                 "resnet18", "--image-size", "32", "--epochs", "6", "--workers", "0",
                 "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.9, metrics["accuracy"]
