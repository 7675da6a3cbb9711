"""Warm-up proves a model answers well-formed probabilities before it may serve."""

from __future__ import annotations

import copy

import pytest
import torch

from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.device import Accelerator
from models.outputs import ModelOutputError, check_probabilities
from models.predict import Predictor
from tests.serving_helpers import CLASSES


def card(pre: Preprocessing, task: str = "single_label") -> ModelCard:
    """A card for the shared three-colour model."""
    return ModelCard(name="colors", arch="resnet18", task=task, classes=CLASSES,
                     preprocessing=pre)


def test_warmup_passes_for_a_sound_model(trained_model) -> None:
    model, pre = trained_model
    for task in ("single_label", "multi_label"):
        cpu = Accelerator.create("cpu")
        Predictor(copy.deepcopy(model), card(pre, task), cpu).warmup([1, 2, 4])


def test_warmup_refuses_a_model_whose_scores_overflow_to_nan(trained_model) -> None:
    model, pre = trained_model
    overflowing = copy.deepcopy(model)
    with torch.no_grad():
        overflowing.fc.weight.fill_(1e38)  # finite weights, infinite logits, NaN softmax
    predictor = Predictor(overflowing, card(pre), Accelerator.create("cpu"))
    with pytest.raises(ModelOutputError, match="NaN or infinite"):
        predictor.warmup([1, 2])


def test_warmup_refuses_outputs_that_do_not_match_the_card(trained_model) -> None:
    _, pre = trained_model
    four_outputs = build("resnet18", num_classes=len(CLASSES) + 1)
    predictor = Predictor(four_outputs, card(pre), Accelerator.create("cpu"))
    with pytest.raises(ModelOutputError, match=r"shape \[1, 4\].*expected.*\[1, 3\]"):
        predictor.warmup([1])


def test_check_probabilities_judges_range_and_row_sums() -> None:
    def single(probs: list[list[float]], rows: int = 1) -> None:
        check_probabilities(torch.tensor(probs), rows=rows, classes=3, task="single_label")

    single([[0.2, 0.3, 0.5]])
    with pytest.raises(ModelOutputError, match="sum to 1"):
        single([[0.2, 0.2, 0.2]])
    with pytest.raises(ModelOutputError, match=r"outside \[0, 1\]"):
        single([[1.5, -0.5, 0.0]])
    with pytest.raises(ModelOutputError, match="shape"):
        single([[0.2, 0.3, 0.5]], rows=2)
    # multi-label rows need not sum to 1
    check_probabilities(torch.tensor([[0.9, 0.9, 0.9]]), rows=1, classes=3, task="multi_label")
