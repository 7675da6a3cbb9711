"""Temperature fitting, ECE and the card's calibration field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.calibration import (
    TEMPERATURE_RANGE,
    expected_calibration_error,
    fit_temperature,
    reliability,
)
from models.card import ModelCard, Preprocessing
from models.outputs import probabilities

CLASSES = ["a", "b", "c"]


def _logits(n: int, c: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * scale


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_single_label_fit_recovers_the_temperature(true_t: float) -> None:
    logits = _logits(20000, 5, seed=1)
    labels = torch.multinomial(torch.softmax(logits / true_t, dim=1), 1,
                               generator=torch.Generator().manual_seed(2)).squeeze(1)
    fitted = fit_temperature(logits.numpy(), labels.numpy(), "single_label")
    assert isinstance(fitted, float)
    assert fitted == pytest.approx(true_t, rel=0.05)


def test_multi_label_fit_recovers_one_temperature_per_class() -> None:
    true_t = torch.tensor([0.4, 1.0, 3.0], dtype=torch.float64)
    logits = _logits(30000, 3, seed=3)
    labels = torch.bernoulli(torch.sigmoid(logits / true_t),
                             generator=torch.Generator().manual_seed(4))
    fitted = fit_temperature(logits.numpy(), labels.numpy(), "multi_label")
    assert isinstance(fitted, list) and len(fitted) == 3
    assert fitted == pytest.approx(true_t.tolist(), rel=0.08)


def test_fit_stays_in_range_and_skips_classes_it_cannot_inform() -> None:
    logits = _logits(200, 3, seed=5)
    separable = logits.argmax(dim=1)  # labels the logits predict perfectly: T wants to be 0
    low, high = TEMPERATURE_RANGE
    single = fit_temperature(logits.numpy(), separable.numpy(), "single_label")
    assert low <= single <= low * 1.01
    labels = torch.stack([torch.ones(200), torch.zeros(200), (logits[:, 2] > 0).double()], 1)
    multi = fit_temperature(logits.numpy(), labels.numpy(), "multi_label")
    assert multi[:2] == [1.0, 1.0]  # all positive, all negative: left alone
    assert low <= multi[2] <= high
    assert fit_temperature(np.zeros((0, 3)), np.zeros((0,)), "single_label") == 1.0


def test_single_label_ece_by_hand() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1],
                      [0.45, 0.3, 0.25]])
    targets = np.array([0, 1, 1, 2])
    # bins of width 1/15: {0.9, 0.9} acc 0.5; {0.7} acc 1; {0.45} acc 0
    expected = 2 / 4 * 0.4 + 1 / 4 * 0.3 + 1 / 4 * 0.45
    assert expected_calibration_error(probs, targets, "single_label") == pytest.approx(expected)
    diagram = reliability(probs, targets, "single_label")
    assert len(diagram["count"]) == 15 and sum(diagram["count"]) == 4
    assert diagram["count"][13] == 2 and diagram["accuracy"][13] == pytest.approx(0.5)
    assert diagram["confidence"][0] is None


def test_multi_label_ece_over_every_image_class_pair() -> None:
    probs = np.array([[0.1, 0.75], [0.1, 0.75]])
    targets = np.array([[0, 1], [1, 0]])
    expected = 2 / 4 * abs(0.5 - 0.1) + 2 / 4 * abs(0.5 - 0.75)
    assert expected_calibration_error(probs, targets, "multi_label") == pytest.approx(expected)


def test_ece_bin_edges_and_perfect_calibration() -> None:
    diagram = reliability(np.array([0.0, 1.0, 0.5]), np.array([0, 1, 1]), "multi_label", bins=2)
    assert diagram["count"] == [2, 1]  # 0 and 0.5 in (0, 0.5] (0 joins the first bin)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([1, 0]),
                                      "multi_label") == 0.0


def test_probabilities_divide_by_the_temperature() -> None:
    logits = _logits(4, 3, seed=6).float()
    assert torch.equal(probabilities(logits, "single_label"), torch.softmax(logits, 1))
    assert torch.allclose(probabilities(logits, "single_label", 2.0),
                          torch.softmax(logits / 2, 1))
    t = [0.5, 1.0, 4.0]
    assert torch.allclose(probabilities(logits, "multi_label", t),
                          torch.sigmoid(logits / torch.tensor(t)))


def _card(task: str = "single_label", calibration: object = None) -> ModelCard:
    return ModelCard(name="m", arch="resnet18", task=task, classes=CLASSES,
                     preprocessing=Preprocessing.for_crop(32), calibration=calibration)


def _calibration(temperature: object, **changes: object) -> dict[str, object]:
    return {"temperature": temperature, "ece_before": 0.2, "ece_after": 0.05, "bins": 15,
            **changes}


def test_card_calibration_round_trips_and_old_cards_have_none() -> None:
    card = _card(calibration=_calibration(1.5))
    again = ModelCard.from_dict(card.to_dict())
    assert again.calibration == card.calibration and again.temperature == 1.5
    multi = _card("multi_label", _calibration([0.5, 1, 2.0]))
    assert multi.temperature == [0.5, 1.0, 2.0]
    old = card.to_dict()
    del old["calibration"]
    assert ModelCard.from_dict(old).temperature is None


@pytest.mark.parametrize(("task", "calibration", "message"), [
    ("single_label", [1.0], "calibration must be an object"),
    ("single_label", {"temperature": 1.0}, "calibration is missing"),
    ("single_label", _calibration(0.0), "calibration.temperature"),
    ("single_label", _calibration(25.0), "calibration.temperature"),
    ("single_label", _calibration(math.nan), "calibration.temperature"),
    ("single_label", _calibration(True), "calibration.temperature"),
    ("single_label", _calibration([1.0, 1.0, 1.0]), "calibration.temperature"),
    ("multi_label", _calibration([1.0, 1.0]), "one per class"),
    ("multi_label", _calibration(1.0), "calibration.temperature"),
    ("single_label", _calibration(1.0, ece_after=1.5), "calibration.ece_after"),
    ("single_label", _calibration(1.0, ece_before="0.1"), "calibration.ece_before"),
    ("single_label", _calibration(1.0, bins=0), "calibration.bins"),
    ("single_label", _calibration(1.0, bins=15.0), "calibration.bins"),
])
def test_card_refuses_bad_calibration(task: str, calibration: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _card(task, calibration)
