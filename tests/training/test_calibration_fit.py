"""A fit calibrates on validation: temperature and ECE in the card, metrics.json and a figure;
multi-label thresholds are tuned on the calibrated scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import checkpoint
from models.calibration import TEMPERATURE_RANGE, expected_calibration_error
from models.outputs import probabilities
from training.distributed import DistInfo
from training.fit import FitRun
from training.loop.metrics import tune_thresholds


def test_single_label_fit_writes_the_calibration(trained) -> None:
    run, out = trained
    card = checkpoint.read_card(out)
    cal = card.calibration
    assert cal is not None and set(cal) == {"temperature", "ece_before", "ece_after", "bins"}
    assert isinstance(cal["temperature"], float) and cal["bins"] == 15
    assert TEMPERATURE_RANGE[0] <= cal["temperature"] <= TEMPERATURE_RANGE[1]
    metrics = json.loads((out / checkpoint.METRICS_FILE).read_text())
    assert {k: metrics["calibration"][k] for k in cal} == cal
    assert sum(metrics["calibration"]["reliability_after"]["count"]) == metrics["num_samples"]
    figure = out / checkpoint.CALIBRATION_FILE
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:4] == b"\x89PNG"
    validation = run.validate(0)  # the best weights are loaded back: the same pass again
    assert validation.calibration["temperature"] == pytest.approx(cal["temperature"], rel=1e-6)
    targets = validation.targets.astype(int)
    assert expected_calibration_error(validation.scores, targets, "single_label") == \
        pytest.approx(cal["ece_after"], abs=1e-6)
    logits, labels = torch.as_tensor(validation.logits), torch.as_tensor(targets)
    nll = torch.nn.functional.cross_entropy  # the fit minimises this over the temperature
    assert nll(logits / cal["temperature"], labels) <= nll(logits, labels) + 1e-6


def test_multi_label_thresholds_are_tuned_on_calibrated_scores(multi_data, tmp_path,
                                                               tiny_config) -> None:
    out = tmp_path / "tags"
    run = FitRun(tiny_config(multi_data, out, epochs=1), DistInfo())
    run.run()
    card = checkpoint.read_card(out)
    temperature = card.temperature
    assert isinstance(temperature, list) and len(temperature) == card.num_classes
    validation = run.validate(0)
    logits = torch.as_tensor(validation.logits)
    calibrated = probabilities(logits, "multi_label", temperature).numpy()
    np.testing.assert_allclose(validation.scores, calibrated, atol=1e-6)
    assert card.thresholds == pytest.approx(tune_thresholds(calibrated, validation.targets))
    assert (out / checkpoint.CALIBRATION_FILE).is_file()
    metrics = json.loads((out / checkpoint.METRICS_FILE).read_text())
    assert metrics["calibration"]["temperature"] == temperature
