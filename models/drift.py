"""Drift: what the validation images looked like to a model, and how far traffic has moved.

Three label-free quantities per image, all from what the model answers anyway:

- `confidence`: the calibrated top-1 probability (the highest served score);
- `unknown_score`: the unknown-input score (models.unknown; cards with that rule only);
- `predicted_class`: the top-1 class (multi-label: the highest-scoring class).

`fit` stores the reference in the card's `drift` field: on the validation images, scored
through the serving Predictor, a histogram of each score over the fixed bins below and how
many images each class was predicted for. The server compares a recent window of images with
it by the population stability index (PSI), per quantity:

    PSI = sum over bins of (p - q) * ln(p / q)

p the window's share of images in a bin, q the reference's, each smoothed by half an image
per bin so that an empty bin on either side keeps the figure finite. PSI is the symmetric
Kullback-Leibler divergence of the two binned distributions: 0 for equal shares, and the
usual reading is under 0.1 no real change, 0.1-0.25 a moderate one, over 0.25 a significant
shift. It needs only bin counts (a bounded window, no raw values kept) and it is comparable
across quantities and models, which a test's p-value (ever smaller as traffic grows) or a
distance in the score's own units (a Wasserstein distance) is not. Its noise floor is about
(bins - 1) * (1/n + 1/m) for n window and m reference images, so a window reports only once
it holds MIN_WINDOW_IMAGES images (models.drift_window) and the class histogram keeps at most
MAX_CLASS_BINS bins.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.outputs import probabilities
from models.shown import shown_value

if TYPE_CHECKING:
    from models.card import ModelCard

QUANTITIES = ("confidence", "unknown_score", "predicted_class")
# the fixed bins (edges, lowest first): finer where a trained model's images gather, top-1
# confidences near 1 and unknown scores near 0 (a validation image of a digits model scores
# about 0.02-0.15; another kind of picture 0.3 and more)
CONFIDENCE_EDGES = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
UNKNOWN_EDGES = (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
                 1.0)
SCORE_RANGES = {"confidence": (0.0, 1.0), "unknown_score": (0.0, 2.0)}  # cosine distance <= 2
MAX_EDGES = 65  # a card's histogram holds at most 64 bins
MAX_IMAGES = 10**12  # the most validation images a reference may count
MAX_CLASS_BINS = 10  # PSI over classes: each class, or the 9 most frequent and the rest
SMOOTHING = 0.5  # images added to every bin on both sides before shares are taken


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_IMAGES


def _is_finite(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def served_quantities(outputs: torch.Tensor | np.ndarray, card: ModelCard
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[N, C(+1)] model outputs (Predictor.outputs) -> each image's calibrated top-1
    confidence, top-1 class index, and unknown score (None for a card without the rule)."""
    outputs = torch.as_tensor(outputs)
    logits = outputs[:, :card.num_classes].float()
    scores = probabilities(logits, card.task, card.temperature)
    confidence, classes = scores.max(dim=1)
    unknown = outputs[:, card.num_classes].double().numpy() if card.unknown is not None \
        else None
    return confidence.double().numpy(), classes.numpy(), unknown


def bin_indices(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Each value's bin: i where edges[i] <= value < edges[i + 1]; values past either end
    fall in the end bins (the top edge itself in the last bin)."""
    inner = np.asarray(edges[1:-1], dtype=np.float64)
    return np.searchsorted(inner, np.asarray(values, dtype=np.float64), side="right")


def histogram(values: np.ndarray, edges: Sequence[float]) -> list[int]:
    """How many `values` fall in each bin of `edges` (see bin_indices)."""
    counts = np.bincount(bin_indices(values, edges), minlength=len(edges) - 1)
    return [int(c) for c in counts]


def reference(outputs: torch.Tensor | np.ndarray, card: ModelCard) -> dict[str, Any]:
    """The card's `drift` field from the validation images' outputs (Predictor.outputs)."""
    if len(outputs) < 1:
        raise ValueError("a drift reference needs at least one validation image")
    confidence, classes, unknown = served_quantities(outputs, card)
    out: dict[str, Any] = {
        "images": len(outputs),
        "confidence": {"edges": list(CONFIDENCE_EDGES),
                       "counts": histogram(confidence, CONFIDENCE_EDGES)},
        "unknown_score": None, "unknown_rate": None,
        "predicted_class": [int(c) for c in np.bincount(classes,
                                                        minlength=card.num_classes)],
    }
    if unknown is not None:
        out["unknown_score"] = {"edges": list(UNKNOWN_EDGES),
                                "counts": histogram(unknown, UNKNOWN_EDGES)}
        out["unknown_rate"] = float(np.mean(unknown > card.unknown_threshold))
    return out


def reference_problems(value: object, num_classes: int) -> list[str]:
    """What is wrong with a card's `drift` field (empty when valid)."""
    if not isinstance(value, dict):
        return [f"drift must be an object, got {shown_value(value)}"]
    missing = [k for k in ("images", "confidence", "predicted_class") if k not in value]
    if missing:
        return [f"drift is missing {missing}"]
    images = value["images"]
    if not _is_count(images) or images < 1:
        return [f"drift.images must be an integer in [1, {MAX_IMAGES}], got {shown_value(images)}"]
    out = _histogram_problems("confidence", value["confidence"], images)
    if value.get("unknown_score") is not None:
        out += _histogram_problems("unknown_score", value["unknown_score"], images)
    out += _counts_problems("drift.predicted_class", value["predicted_class"],
                            count=num_classes, total=images, per="one per class")
    rate = value.get("unknown_rate")
    if rate is not None and (not _is_finite(rate) or not 0.0 <= rate <= 1.0):
        out.append(f"drift.unknown_rate must be a number in [0, 1], got {shown_value(rate)}")
    return out


def _histogram_problems(name: str, value: object, images: int) -> list[str]:
    """What is wrong with one of the reference's histograms (empty when valid)."""
    what = f"drift.{name}"
    if not isinstance(value, dict) or not {"edges", "counts"} <= set(value):
        return [f"{what} must be an object with edges and counts, got {shown_value(value)}"]
    edges, (low, high) = value["edges"], SCORE_RANGES[name]
    if not isinstance(edges, list) or not 2 <= len(edges) <= MAX_EDGES or \
            not all(_is_finite(e) and low <= e <= high for e in edges) or \
            any(a >= b for a, b in zip(edges[:-1], edges[1:], strict=True)):
        return [f"{what}.edges must be 2 to {MAX_EDGES} increasing numbers in [{low}, {high}], "
                f"got {shown_value(edges)}"]
    return _counts_problems(f"{what}.counts", value["counts"], count=len(edges) - 1,
                            total=images, per="one per bin")


def _counts_problems(what: str, counts: object, *, count: int, total: int, per: str
                     ) -> list[str]:
    """Why `counts` is not `count` image counts adding up to `total` (empty when it is)."""
    if not isinstance(counts, list) or len(counts) != count or \
            not all(_is_count(c) for c in counts):
        return [f"{what} must be {count} counts of images ({per}), got {shown_value(counts)}"]
    if sum(counts) != total:
        return [f"{what} must add up to drift.images ({total}), got {sum(counts)}"]
    return []


def class_bins(reference_counts: Sequence[int]) -> np.ndarray:
    """Class index -> bin of the class histogram PSI is taken over: each class when there
    are at most MAX_CLASS_BINS, else the most frequent MAX_CLASS_BINS - 1 classes of the
    reference (ties: the lower index) and one bin for all the others."""
    counts = np.asarray(reference_counts, dtype=np.int64)
    if counts.size <= MAX_CLASS_BINS:
        return np.arange(counts.size)
    kept = np.argsort(-counts, kind="stable")[:MAX_CLASS_BINS - 1]
    bins = np.full(counts.size, MAX_CLASS_BINS - 1)
    bins[kept] = np.arange(kept.size)
    return bins


def psi(recent: np.ndarray, expected: np.ndarray) -> float:
    """The population stability index of the `recent` bin counts against the `expected`
    ones (same bins), each smoothed by SMOOTHING images per bin."""
    p = np.asarray(recent, dtype=np.float64) + SMOOTHING
    q = np.asarray(expected, dtype=np.float64) + SMOOTHING
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))
