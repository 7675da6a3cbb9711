"""The drift reference and its figures: the card's `drift` field validated strictly (older
cards without it still load), the window's counts equal to counting its images again, the
population stability index as defined, and the per-model series bounded and never raising."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.serving.drift import MAX_CLASS_SERIES, OTHER_CLASS, DriftMetrics
from models.card import ModelCard
from models.drift import (
    CONFIDENCE_EDGES,
    MAX_CLASS_BINS,
    MAX_EDGES,
    UNKNOWN_EDGES,
    bin_indices,
    class_bins,
    histogram,
    psi,
    reference,
)
from models.drift_window import DriftWindow

CLASSES = ["cat", "dog", "fox"]
UNKNOWN = {"method": "cosine", "threshold": 0.3, "acceptance": 0.95}


def card(classes: list[str] = CLASSES, **fields: object) -> ModelCard:
    return ModelCard(name="m", arch="resnet18", task="single_label", classes=classes,
                     **fields)


def outputs(count: int, classes: int = 3, *, seed: int = 0, unknown: bool = True,
            shift: float = 0.0) -> torch.Tensor:
    """[count, classes (+1)] logits and unknown scores (uniform in [shift, shift + 0.4])."""
    rng = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, classes, generator=rng) * 3
    if not unknown:
        return logits
    scores = shift + 0.4 * torch.rand(count, 1, generator=rng)
    return torch.cat([logits, scores], dim=1)


def reference_card(count: int = 400, **fields: object) -> ModelCard:
    base = card(unknown=UNKNOWN, **fields)
    return dataclasses.replace(base, drift=reference(outputs(count), base))


def test_a_reference_round_trips_through_the_card_and_old_cards_still_load() -> None:
    built = reference_card()
    drift = built.drift
    assert drift["images"] == 400 == sum(drift["confidence"]["counts"])
    assert drift["confidence"]["edges"] == list(CONFIDENCE_EDGES)
    assert drift["unknown_score"]["edges"] == list(UNKNOWN_EDGES)
    assert sum(drift["predicted_class"]) == 400 and len(drift["predicted_class"]) == 3
    assert drift["unknown_rate"] == pytest.approx(
        float(np.mean(outputs(400)[:, 3].numpy() > UNKNOWN["threshold"])))
    again = ModelCard.from_dict(json.loads(json.dumps(built.to_dict())))
    assert again.drift == drift
    old = {k: v for k, v in built.to_dict().items() if k != "drift"}
    assert ModelCard.from_dict(old).drift is None
    without_rule = card()  # no unknown rule: no unknown histogram, no rate
    plain = reference(outputs(50, unknown=False), without_rule)
    assert plain["unknown_score"] is None and plain["unknown_rate"] is None
    assert dataclasses.replace(without_rule, drift=plain).drift == plain


def _broken(change) -> dict:
    data = reference_card(40).to_dict()
    change(data["drift"])
    return data


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.clear(), "drift is missing"),
    (lambda d: d.update(images=True), "drift.images must be an integer"),
    (lambda d: d.update(images=0), "drift.images must be an integer"),
    (lambda d: d.update(images=10**13), "drift.images must be an integer"),
    (lambda d: d.update(confidence=[1, 2]), "drift.confidence must be an object"),
    (lambda d: d["confidence"].update(edges=[0.0, 0.5, 0.5, 1.0], counts=[40, 0, 0]),
     "drift.confidence.edges must be"),
    (lambda d: d["confidence"].update(edges=[0.0, 1.5], counts=[40]),
     "drift.confidence.edges must be"),
    (lambda d: d["confidence"].update(edges=[0.0, float("nan")], counts=[40]),
     "drift.confidence.edges must be"),
    (lambda d: d["confidence"].update(edges=[i / 100 for i in range(MAX_EDGES + 1)],
                                      counts=[40] + [0] * (MAX_EDGES - 1)),
     "drift.confidence.edges must be"),
    (lambda d: d["confidence"].update(counts=d["confidence"]["counts"][:-1]),
     "drift.confidence.counts must be"),
    (lambda d: d["confidence"]["counts"].__setitem__(0, -1), "drift.confidence.counts must be"),
    (lambda d: d["confidence"]["counts"].__setitem__(0, 1.5),
     "drift.confidence.counts must be"),
    (lambda d: d["confidence"]["counts"].__setitem__(0, d["confidence"]["counts"][0] + 1),
     "must add up to drift.images"),
    (lambda d: d["unknown_score"].update(edges="0,1"), "drift.unknown_score.edges must be"),
    (lambda d: d.update(predicted_class=[40]), "drift.predicted_class must be 3 counts"),
    (lambda d: d.update(predicted_class=[40, 0, 1]), "must add up to drift.images"),
    (lambda d: d.update(unknown_rate=1.5), "drift.unknown_rate must be a number"),
    (lambda d: d.update(unknown_rate="low"), "drift.unknown_rate must be a number"),
])
def test_a_malformed_reference_is_refused_saying_what_is_wrong(change, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelCard.from_dict(_broken(change))


def test_a_reference_that_is_not_an_object_is_refused() -> None:
    data = reference_card(40).to_dict()
    with pytest.raises(ValueError, match="drift must be an object"):
        ModelCard.from_dict({**data, "drift": [1, 2, 3]})


def test_values_fall_in_the_bins_the_edges_say() -> None:
    edges = (0.0, 0.5, 0.9, 1.0)
    values = np.array([-0.1, 0.0, 0.49, 0.5, 0.89, 0.9, 0.99, 1.0, 1.7])
    assert bin_indices(values, edges).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert histogram(values, edges) == [3, 2, 4]


def test_psi_is_zero_for_equal_shares_and_as_defined_otherwise() -> None:
    assert psi(np.array([10, 30, 60]), np.array([10, 30, 60])) == pytest.approx(0.0)
    recent, expected = np.array([50, 30, 20]), np.array([20, 30, 50])
    p, q = (recent + 0.5) / 101.5, (expected + 0.5) / 101.5
    assert psi(recent, expected) == pytest.approx(float(np.sum((p - q) * np.log(p / q))))
    assert psi(recent, expected) == pytest.approx(psi(expected, recent))  # symmetric
    # an empty bin on either side keeps the figure finite
    assert math.isfinite(psi(np.array([100, 0]), np.array([0, 100])))


def test_classes_past_the_cap_share_one_bin_after_the_most_frequent() -> None:
    counts = [5, 1, 9, 0, 7, 3, 3, 2, 8, 4, 6, 1, 2]
    bins = class_bins(counts)
    assert bins.max() == MAX_CLASS_BINS - 1
    kept = [i for i in range(len(counts)) if bins[i] < MAX_CLASS_BINS - 1]
    assert sorted(kept) == sorted(np.argsort(-np.array(counts), kind="stable")[:9].tolist())
    assert class_bins([3, 1, 2]).tolist() == [0, 1, 2]


def test_the_window_counts_equal_counting_its_last_images_again() -> None:
    built = reference_card()
    window = DriftWindow(built.drift, unknown=True, size=50, min_images=20)
    rng = np.random.default_rng(0)
    seen = {"confidence": [], "unknown_score": [], "predicted_class": []}
    for batch in (7, 13, 1, 30, 49, 3, 64, 5, 50, 2):  # some past the window's size
        confidence, unknown = rng.random(batch), rng.random(batch) * 0.6
        classes = rng.integers(0, 3, batch)
        window.add(confidence, classes, unknown)
        seen["confidence"] += confidence.tolist()
        seen["unknown_score"] += unknown.tolist()
        seen["predicted_class"] += classes.tolist()
        last = {q: np.array(v[-50:]) for q, v in seen.items()}
        assert len(window) == len(last["confidence"])
        if len(window) < 20:
            assert window.psi() == {}
            continue
        expected = {
            "confidence": psi(np.array(histogram(last["confidence"], CONFIDENCE_EDGES)),
                              np.array(built.drift["confidence"]["counts"])),
            "unknown_score": psi(np.array(histogram(last["unknown_score"], UNKNOWN_EDGES)),
                                 np.array(built.drift["unknown_score"]["counts"])),
            "predicted_class": psi(np.bincount(last["predicted_class"], minlength=3),
                                   np.array(built.drift["predicted_class"])),
        }
        assert window.psi() == pytest.approx(expected)


def test_a_window_without_unknown_scores_compares_the_rest() -> None:
    built = reference_card()
    window = DriftWindow(built.drift, unknown=False, size=10, min_images=5)
    assert window.quantities == ("confidence", "predicted_class")
    window.add(np.full(6, 0.99), np.zeros(6, dtype=int))
    assert set(window.psi()) == {"confidence", "predicted_class"}
    with pytest.raises(ValueError, match="min_images"):
        DriftWindow(built.drift, unknown=True, size=10, min_images=11)


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    text = generate_latest(registry).decode()
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


def test_the_class_counter_keeps_the_model_classes_and_one_other_series_past_the_cap() -> None:
    registry = CollectorRegistry()
    names = [f"c{i}" for i in range(MAX_CLASS_SERIES + 20)]
    drift = DriftMetrics(registry).watch("many", card(names))
    logits = torch.full((len(names), len(names)), -5.0)
    logits[torch.arange(len(names)), torch.arange(len(names))] = 5.0  # each class once
    drift.observe(logits)
    counted = _samples(registry, "resnet_serve_predicted_class_total")
    labels = {dict(key)["class"] for key in counted}
    assert labels == set(names[:MAX_CLASS_SERIES]) | {OTHER_CLASS}
    assert counted[(("class", OTHER_CLASS), ("model", "many"))] == 20
    assert sum(counted.values()) == len(names)


def test_observing_never_raises_and_a_new_version_starts_its_figures_afresh(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    metrics = DriftMetrics(registry)
    built = reference_card()
    first = metrics.watch("m", built)
    first.observe(outputs(300, shift=0.6))  # unknown scores far past the reference's
    figures = _samples(registry, "resnet_serve_drift_psi")
    assert figures[(("model", "m"), ("quantity", "unknown_score"))] > 1.0
    first.observe(torch.zeros(5))  # not a batch of outputs: logged, not raised
    assert "drift figures of model m were not updated" in caplog.text
    metrics.watch("m", built)  # the next version of the model
    assert _samples(registry, "resnet_serve_drift_psi") == {}
    assert _samples(registry, "resnet_serve_drift_window_images") == {(("model", "m"),): 0}
    rate = _samples(registry, "resnet_serve_reference_unknown_rate")
    assert rate == {(("model", "m"),): built.drift["unknown_rate"]}
    metrics.forget("m")
    for gone in ("psi", "window_images"):
        assert _samples(registry, f"resnet_serve_drift_{gone}") == {}
    assert _samples(registry, "resnet_serve_reference_unknown_rate") == {}
