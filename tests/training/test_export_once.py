"""Each export writes the checkpoint once: the best epoch when it is reached, and the final
export (the whole run's record, the unknown-input rule, the drift reference) from the best
weights kept in memory, never read back from disk."""

from __future__ import annotations

from pathlib import Path

import torch

from models import checkpoint
from training.distributed import DistInfo
from training.fit import FitRun


def test_a_one_epoch_fit_writes_the_checkpoint_twice_and_reads_it_never(
        single_data: Path, tmp_path: Path, tiny_config, monkeypatch) -> None:
    saved, loaded = [], []
    save, load = checkpoint.save, checkpoint.load
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: saved.append(a[2]) or save(*a, **k))
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: loaded.append(a) or load(*a, **k))
    out = tmp_path / "once"
    run = FitRun(tiny_config(single_data, out, epochs=1), DistInfo())
    run.run()
    assert loaded == []
    best, final = saved  # the best epoch's export, then the final one
    assert best.unknown is None and best.drift is None
    assert final.unknown is not None and final.drift is not None
    assert (final.metrics, final.thresholds, final.calibration) == (
        best.metrics, best.thresholds, best.calibration)
    model, card = load(out)
    assert card.drift == final.drift and card.training["epochs_run"] == 1
    for key, value in run.learner.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value.cpu())
