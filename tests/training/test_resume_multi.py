"""Resume continues exactly where a run stopped; the CSV / multi-label path end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models import checkpoint
from training.commands.evaluate import evaluate_checkpoint
from training.config import EvaluateConfig
from training.distributed import DistInfo
from training.fit import FitRun, fit


class Interrupted(Exception):
    pass


def _stop_after_first(epoch: int, row: dict) -> None:
    if epoch == 0:
        raise Interrupted


def test_resume_continues_where_it_stopped(single_data, tmp_path, tiny_config):
    straight = tmp_path / "straight"
    fit(tiny_config(single_data, straight, epochs=2))

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        fit(tiny_config(single_data, resumed, epochs=2), on_epoch_end=_stop_after_first)
    state = torch.load(resumed / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1

    run = FitRun(tiny_config(single_data, resumed, epochs=2, resume=resumed / "last.pt"),
                 DistInfo())
    run.run()
    assert [row["epoch"] for row in run.progress.history] == [1, 2]
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, msg=key)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert load_file(str(straight / "model.safetensors")).keys() == \
        load_file(str(resumed / "model.safetensors")).keys()


def test_resume_refuses_a_state_for_other_data(single_data, multi_data, tmp_path,
                                                  tiny_config):
    out = tmp_path / "run"
    fit(tiny_config(single_data, out))
    from training.exceptions import DataError, ResumeError

    with pytest.raises(DataError, match="images of the recorded split are gone"):
        fit(tiny_config(multi_data, out, resume=out / "last.pt"))
    with pytest.raises(ResumeError, match="no resume state"):
        fit(tiny_config(single_data, out, resume=out / "missing.pt"))


def test_multi_label_csv_run(multi_data, tmp_path, tiny_config):
    out = tmp_path / "multi"
    metrics = fit(tiny_config(multi_data, out, epochs=1))
    card = checkpoint.read_card(out)
    assert card.task == "multi_label"
    assert card.classes == ["circle", "cross", "square", "triangle"]
    assert card.thresholds is not None and len(card.thresholds) == 4
    assert all(0 < t <= 1 for t in card.thresholds)
    assert {"mAP", "f1_micro", "f1_macro", "per_class"} <= set(metrics)
    assert "cross-fitted" in metrics["f1_thresholds"] == card.metrics["f1_thresholds"]
    assert (out / "pr_curves.png").is_file() and not (out / "confusion_matrix.png").exists()
    evaluated = evaluate_checkpoint(EvaluateConfig(checkpoint=out, data=multi_data, device="cpu"))
    assert {"mAP", "f1_micro", "f1_macro"} <= set(evaluated)
    assert set(evaluated["per_class"]["circle"]) >= {"precision", "recall", "f1", "ap"}
    assert json.loads(json.dumps(evaluated)) == evaluated
