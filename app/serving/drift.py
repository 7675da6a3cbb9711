"""Drift and quality series per model: what the served images look like, and how far that
has moved from the validation images in the model's card (models.drift).

Every batch a model answers (POST /predict and the Open Inference Protocol alike) is seen
once, on the compute thread, by its ModelDrift: the calibrated top-1 confidence and the
unknown score go into histograms over the card's fixed bins, the predicted class into a
counter, and the bins into the model's DriftWindow (the last WINDOW_IMAGES images), whose
PSI per quantity is the gauge `resnet_serve_drift_psi`.

With `--workers N` each worker keeps its own window of the images it answered (the kernel
spreads connections over the workers, so each window samples the same traffic) and writes
its own figures; a scrape shows the largest over the live workers (multiprocess_mode
"livemax"), the worst recent window, which is what an alert wants. Computing PSI in PromQL
from the histograms was the alternative: it needs per-bin shares (Prometheus buckets are
cumulative) and the reference exported as series, and measures a time range rather than a
number of images. Label values stay in closed sets: model names (the checkpoints loaded),
models.drift.QUANTITIES, and class names of the model's own card up to MAX_CLASS_SERIES, the rest
counted under OTHER_CLASS.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from models.card import ModelCard
from models.drift import CONFIDENCE_EDGES, UNKNOWN_EDGES, served_quantities
from models.drift_window import DriftWindow

logger = logging.getLogger(__name__)

PREFIX = "resnet_serve"
MAX_CLASS_SERIES = 50  # classes counted under their own name; past this, under OTHER_CLASS
OTHER_CLASS = "other"
BatchFn = Callable[[list[Any]], Sequence[Any]]


class DriftMetrics:
    """The drift and quality series of every model, in one app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.confidence = Histogram(
            f"{PREFIX}_top1_confidence", "calibrated top-1 probability of each image answered",
            ["model"], buckets=CONFIDENCE_EDGES[1:], registry=registry)
        self.unknown_score = Histogram(
            f"{PREFIX}_unknown_score", "unknown-input score of each image answered (models "
            "with the rule)", ["model"], buckets=UNKNOWN_EDGES[1:], registry=registry)
        self.unknown = Counter(f"{PREFIX}_unknown_images",
                               "images answered whose unknown score passed the card's threshold",
                               ["model"], registry=registry)
        self.predicted = Counter(
            f"{PREFIX}_predicted_class", f"images answered per top-1 class (past the first "
            f"{MAX_CLASS_SERIES} classes of a model: '{OTHER_CLASS}')", ["model", "class"],
            registry=registry)
        self.psi = Gauge(f"{PREFIX}_drift_psi",
                         "population stability index of the last images answered against the "
                         "card's validation images, per quantity (the largest over workers)",
                         ["model", "quantity"], registry=registry, multiprocess_mode="livemax")
        self.window = Gauge(f"{PREFIX}_drift_window_images",
                            "images in the recent windows the drift figures compare",
                            ["model"], registry=registry, multiprocess_mode="livesum")
        self.reference_unknown_rate = Gauge(
            f"{PREFIX}_reference_unknown_rate",
            "share of the card's validation images past the unknown threshold", ["model"],
            registry=registry, multiprocess_mode="livemax")
        self._written: dict[str, set[tuple[Gauge, tuple[str, ...]]]] = {}

    def watch(self, model: str, card: ModelCard) -> ModelDrift:
        """The observer of a model version starting to serve: its figures start afresh."""
        self._clear(model)
        rate = _reference_unknown_rate(card)
        if rate is not None:
            self.gauge(self.reference_unknown_rate, model).set(rate)
        return ModelDrift(self, model, card)

    def forget(self, model: str) -> None:
        """Stop reporting figures of a model that is gone (its counts stay)."""
        self._clear(model)

    def _clear(self, model: str) -> None:
        """Drop the gauges this process wrote for `model`; a worker's metrics file keeps the
        last value written, so each is zeroed first."""
        for gauge, labels in self._written.pop(model, set()):
            gauge.labels(*labels).set(0)
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    def gauge(self, gauge: Gauge, model: str, *labels: str) -> Gauge:
        """`gauge`'s child for `model` (and `labels`), remembered so `forget` can drop it."""
        self._written.setdefault(model, set()).add((gauge, (model, *labels)))
        return gauge.labels(model, *labels)


def _reference_unknown_rate(card: ModelCard) -> float | None:
    """The share of validation images past the unknown threshold: measured when the card has
    a drift reference, else the share the threshold was set to leave out."""
    if card.unknown is None:
        return None
    if card.drift is not None and card.drift.get("unknown_rate") is not None:
        return float(card.drift["unknown_rate"])
    return 1.0 - float(card.unknown["acceptance"])


class ModelDrift:
    """One model version's observer: fills the series and its DriftWindow from each batch."""

    def __init__(self, metrics: DriftMetrics, model: str, card: ModelCard) -> None:
        self.model, self.card = model, card
        self._lock = threading.Lock()
        self._window = None if card.drift is None else DriftWindow(
            card.drift, unknown=card.unknown is not None)
        self._confidence = metrics.confidence.labels(model)
        # the unknown score's histogram and the count past the threshold (cards with the rule)
        self._unknown = None if card.unknown is None else (
            metrics.unknown_score.labels(model), metrics.unknown.labels(model))
        self._metrics = metrics  # the PSI series start with the first figure, not at 0
        self._window_size = None if self._window is None else metrics.gauge(metrics.window,
                                                                              model)
        names = card.classes[:MAX_CLASS_SERIES] + \
            ([OTHER_CLASS] if card.num_classes > MAX_CLASS_SERIES else [])
        self._classes = [metrics.predicted.labels(model, name) for name in names]

    @property
    def quantities(self) -> tuple[str, ...]:
        """The quantities this model's drift figures compare (none without a reference)."""
        return () if self._window is None else self._window.quantities

    def around(self, run: BatchFn) -> BatchFn:
        """`run` (a batch function answering Predictor outputs), observing what it answers."""

        def observed(images: list[Any]) -> Sequence[Any]:
            outputs = run(images)
            self.observe(outputs)
            return outputs

        return observed

    def observe(self, outputs: torch.Tensor) -> None:
        """Take in one batch's outputs ([N, C] logits, then the unknown score where the card
        has the rule); never raises, since metrics must not break serving."""
        try:
            self._observe(outputs)
        except Exception:  # noqa: BLE001
            logger.exception("drift figures of model %s were not updated", self.model)

    def _observe(self, outputs: torch.Tensor) -> None:
        confidence, classes, unknown = served_quantities(outputs, self.card)
        for value in confidence.tolist():
            self._confidence.observe(value)
        for index, count in zip(*np.unique(np.minimum(classes, MAX_CLASS_SERIES),
                                           return_counts=True), strict=True):
            self._classes[int(index)].inc(int(count))
        if unknown is not None and self._unknown is not None:
            scores, flagged = self._unknown
            for value in unknown.tolist():
                scores.observe(value)
            flagged.inc(int(np.sum(unknown > self.card.unknown_threshold)))
        if self._window is None or self._window_size is None:
            return
        with self._lock:
            self._window.add(confidence, classes, unknown)
            figures = self._window.psi()
            self._window_size.set(len(self._window))
        for quantity, value in figures.items():
            self._metrics.gauge(self._metrics.psi, self.model, quantity).set(value)

    def figures(self) -> dict[str, float]:
        """The current PSI per quantity (empty until the window holds enough images)."""
        if self._window is None:
            return {}
        with self._lock:
            return self._window.psi()
