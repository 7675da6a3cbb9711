"""The unknown-input scores (the stage score `fit` stores and the cosine rule of older
checkpoints), the 95% threshold, AUROC, the card rule, the Predictor verdict on both
backends."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from models import checkpoint
from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.device import Accelerator
from models.predict import Predictor
from models.unknown import (
    ACCEPTANCE,
    BENCH_FLAGGED,
    COSINE,
    METHOD,
    WithFeatures,
    acceptance_threshold,
    attach_state,
    auroc,
    class_means,
    cosine_distance,
    expected_flagging,
    unknown_record,
)
from models.unknown_stages import StagedNetwork, fit_state

PRE = Preprocessing.for_crop(32)
CLASSES = ["cat", "dog", "fox", "owl"]


def test_class_means_are_unit_means_of_each_class_and_distance_is_one_minus_best_cosine() -> None:
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    single = class_means(features, torch.tensor([0, 0, 1, 1]), 3)
    # class 2 has no image: it gets the mean of all of them
    expected = torch.nn.functional.normalize(torch.tensor([[2.0, 0.0], [0.5, 1.5],
                                                           [1.25, 0.75]]), dim=1)
    torch.testing.assert_close(single, expected)
    multi = class_means(features, torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 1], [1, 1, 0]]),
                        3)
    torch.testing.assert_close(multi[0], torch.nn.functional.normalize(
        torch.tensor([5.0, 1.0]), dim=0))
    probe = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    distance = cosine_distance(probe, single[:2])
    cos_second = float(expected[1] @ torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(distance, torch.tensor([0.0, 1.0 - cos_second,
                                                       1.0 - float(-expected[1][0])]))


def test_features_are_the_heads_input_and_the_model_is_unchanged() -> None:
    torch.manual_seed(0)
    model = build("resnet18", num_classes=3).eval()
    split = WithFeatures(model, "fc")
    x = torch.randn(2, 3, 32, 32)
    logits, features = split(x)
    assert features.shape == (2, 512) and isinstance(model.fc, torch.nn.Linear)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(model.fc(features), logits)


@pytest.mark.parametrize("n", [1, 2, 7, 20, 101, 1000])
def test_the_threshold_accepts_95_percent_and_no_lower_one_does(n: int) -> None:
    rng = np.random.default_rng(n)
    scores = np.round(rng.normal(size=n), 1)  # ties included
    threshold = acceptance_threshold(scores)
    assert np.mean(scores <= threshold) >= 0.95
    lower = scores[scores < threshold]
    if lower.size:
        assert np.mean(scores <= lower.max()) < 0.95
    record = unknown_record(scores)
    assert record["threshold"] == threshold and record["val_accepted"] >= 0.95
    assert record["method"] == "cosine" and record["val_images"] == n


def test_the_threshold_refuses_no_scores_or_nan() -> None:
    with pytest.raises(ValueError):
        acceptance_threshold([])
    with pytest.raises(ValueError):
        acceptance_threshold([0.1, float("nan")])


def _pairwise_auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    wins = sum(1.0 if o > i else 0.5 if o == i else 0.0
               for i, o in itertools.product(inside, outside))
    return wins / (len(inside) * len(outside))


def test_auroc_is_the_share_of_pairs_the_unknown_input_wins() -> None:
    rng = np.random.default_rng(1)
    inside, outside = np.round(rng.normal(0, 1, 40), 1), np.round(rng.normal(0.8, 1, 25), 1)
    assert auroc(inside, outside) == pytest.approx(_pairwise_auroc(inside, outside))
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.ones(5), np.ones(3)) == 0.5


def _card(unknown: dict | None = None, task: str = "single_label") -> ModelCard:
    return ModelCard(name="t", arch="resnet18", task=task, classes=CLASSES,
                     preprocessing=PRE, unknown=unknown)


def test_the_card_accepts_a_rule_and_refuses_broken_ones() -> None:
    good = {"method": "cosine", "threshold": 0.35, "acceptance": 0.95}
    assert _card(good).unknown_threshold == 0.35
    assert _card({**good, "method": METHOD, "threshold": 4.5}).unknown_threshold == 4.5
    assert _card(None).unknown_threshold is None
    broken = [({"method": "cosine", "acceptance": 0.95}, "missing ['threshold']"),
              ({**good, "method": "mahalanobis"}, "unknown.method"),
              ({**good, "threshold": float("nan")}, "unknown.threshold"),
              ({**good, "acceptance": 0.0}, "unknown.acceptance"),
              ("cosine", "unknown must be an object")]
    for value, message in broken:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _card(value)  # type: ignore[arg-type]


def test_the_rule_states_what_the_benchmark_flagged_at_its_acceptance() -> None:
    stated = {a: expected_flagging(a)["expected_flagged"] for a in BENCH_FLAGGED}
    assert {0.9, ACCEPTANCE, 0.99} <= set(stated)
    for acceptance, figures in stated.items():
        assert figures["acceptance"] == acceptance and "bench.unknown" in figures["measured_by"]
        shares = [v for k, v in figures.items() if k not in ("acceptance", "measured_by")]
        assert shares and all(0.0 <= v <= 1.0 for v in shares)
    # a stricter acceptance flags more of everything: far-away, new classes and own images
    for key in ("far_worst", "near_mean", "own_mean"):
        assert stated[0.9][key] >= stated[ACCEPTANCE][key] >= stated[0.99][key]
    assert expected_flagging(0.8) == {}
    card = _card({**_rule(1.0, METHOD), **expected_flagging(ACCEPTANCE)})
    again = ModelCard.from_dict(card.to_dict())
    assert again.unknown["expected_flagged"] == stated[ACCEPTANCE]


def _stage_state() -> dict[str, torch.Tensor]:
    """A stage state fitted on the pooled features of random images."""
    torch.manual_seed(0)
    staged = StagedNetwork(build("resnet18", num_classes=len(CLASSES)).eval(), "fc")
    with torch.no_grad():
        _, pooled = staged(torch.randn(16, 3, 32, 32))
    return fit_state([(pooled, torch.arange(16) % len(CLASSES))], pooled, len(CLASSES))


def _model(task: str = "single_label", means: bool = True,
           method: str = COSINE) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build("resnet18", num_classes=len(CLASSES))
    if means and method == COSINE:
        generator = torch.Generator().manual_seed(1)
        checkpoint.attach_class_means(model, torch.nn.functional.normalize(
            torch.rand(len(CLASSES), 512, generator=generator), dim=1))
    elif means:
        attach_state(model, _stage_state())
    return model


def _predictor(unknown: dict | None, task: str = "single_label", **kw: object) -> Predictor:
    method = unknown["method"] if unknown else COSINE
    return Predictor(_model(task, means=unknown is not None, method=method),
                     _card(unknown, task), Accelerator.create("cpu"), **kw)


def _batch(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(n))


def _rule(threshold: float, method: str = COSINE) -> dict:
    return {"method": method, "threshold": threshold, "acceptance": 0.5}


@pytest.mark.parametrize("method", [METHOD, COSINE])
@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_images_past_the_threshold_are_unknown_and_rejected_only_when_asked(
        task: str, method: str) -> None:
    probe = _predictor(_rule(0.5, method), task)
    outputs = probe.outputs(_batch(8))
    scores = probe.unknown_scores(outputs)
    assert outputs.shape == (8, len(CLASSES) + 1) and scores is not None
    plain = _predictor(None, task).outputs(_batch(8))
    torch.testing.assert_close(outputs[:, :len(CLASSES)], plain, atol=1e-4, rtol=1e-4)
    cut = float(scores.median())
    predictor = _predictor(_rule(cut, method), task)
    kept = predictor.answer(outputs, top_k=2, threshold=0.0)
    rejected = predictor.answer(outputs, top_k=2, threshold=0.0, reject_unknown=True)
    flags = [r.unknown for r in kept]
    assert flags == (scores > cut).tolist() and any(flags) and not all(flags)
    for plain_result, strict, score in zip(kept, rejected, scores.tolist(), strict=True):
        assert plain_result.unknown_score == pytest.approx(score) == strict.unknown_score
        assert plain_result.predictions  # every label passes threshold 0; top-2 always answers
        assert strict.predictions == ([] if plain_result.unknown else plain_result.predictions)


@pytest.mark.parametrize("method", [METHOD, COSINE])
@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_the_score_is_computed_from_the_same_forward_pass_by_both_backends(
        task: str, method: str) -> None:
    pytest.importorskip("onnxruntime")
    rule = _rule(0.5, method)
    torch_run = _predictor(rule, task)
    onnx_run = _predictor(rule, task, backend="onnxruntime", threads=1)
    batch = _batch(5)
    expected = torch_run.outputs(batch)
    got = onnx_run.outputs(batch)
    assert got.shape == (5, len(CLASSES) + 1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_without_a_rule_there_is_no_score_no_verdict_and_no_rejecting() -> None:
    predictor = _predictor(None)
    outputs = predictor.outputs(_batch(3))
    assert outputs.shape == (3, len(CLASSES)) and predictor.unknown_scores(outputs) is None
    for result in predictor.answer(outputs):
        assert result.unknown is None and result.unknown_score is None
    with pytest.raises(ValueError, match="unknown-input threshold"):
        predictor.answer(outputs, reject_unknown=True)


def test_a_card_with_a_rule_needs_the_class_means() -> None:
    with pytest.raises(ValueError, match="class means"):
        Predictor(_model(means=False), _card(_rule(0.5)), Accelerator.create("cpu"))


def test_the_served_probabilities_are_the_scores_of_the_logits() -> None:
    predictor = _predictor(None)
    batch = _batch(4)
    torch.testing.assert_close(predictor.probabilities(batch),
                               torch.softmax(predictor.outputs(batch), dim=1))
