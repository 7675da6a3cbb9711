"""Temperature scaling: fit a temperature on held-out logits, and measure calibration.

Single-label models get one temperature T for softmax(logits / T); multi-label models one
per class for sigmoid(logits / T). A temperature is fitted by minimising the negative log
likelihood over log T with a golden-section search inside TEMPERATURE_RANGE (the likelihood
is unimodal in log T, so the search finds its minimum and never leaves the range).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TEMPERATURE_RANGE = (0.05, 20.0)  # the temperatures a fit may return and a card may hold
ECE_BINS = 15
SEARCH_STEPS = 80  # golden-section steps: the log-T interval shrinks by 0.618 each

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _nll_per_column(logits: torch.Tensor, targets: torch.Tensor, log_t: torch.Tensor,
                    task: str) -> torch.Tensor:
    """Mean NLL at log-temperatures `log_t` ([1] single-label, [C] multi-label)."""
    scaled = logits / log_t.exp()
    if task == "single_label":
        return F.cross_entropy(scaled, targets.long()).reshape(1)
    return F.binary_cross_entropy_with_logits(scaled, targets, reduction="none").mean(dim=0)


def _golden_section(loss: Any, size: int) -> torch.Tensor:
    """The log T in the range minimising the unimodal `loss(log_t) -> [size]`, per column."""
    low = torch.full((size,), math.log(TEMPERATURE_RANGE[0]), dtype=torch.float64)
    high = torch.full((size,), math.log(TEMPERATURE_RANGE[1]), dtype=torch.float64)
    a, b = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(SEARCH_STEPS):
        left = fa <= fb  # the minimum lies in [low, b]; else in [a, high]
        high, low = torch.where(left, b, high), torch.where(left, low, a)
        new = torch.where(left, high - _GOLDEN * (high - low), low + _GOLDEN * (high - low))
        f_new = loss(new)
        a, b, fa, fb = (torch.where(left, new, b), torch.where(left, a, new),
                        torch.where(left, f_new, fb), torch.where(left, fa, f_new))
    return (low + high) / 2


def fit_temperature(logits: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
                    task: str) -> float | list[float]:
    """The temperature(s) minimising NLL of `targets` (class indices, or 0/1 [N, C]) under
    [N, C] `logits`: one float (single-label) or one per class (multi-label). Where the data
    cannot inform a temperature (no samples; a class with no positives or no negatives) it
    is 1.0."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
    if task == "single_label":
        if z.shape[0] == 0:
            return 1.0
        log_t = _golden_section(lambda t: _nll_per_column(z, y, t, task), 1)
        return float(log_t.exp()[0])
    if z.shape[0] == 0:
        return [1.0] * z.shape[1]
    log_t = _golden_section(lambda t: _nll_per_column(z, y, t, task), z.shape[1])
    positives = (y > 0.5).sum(dim=0)
    informative = (positives > 0) & (positives < z.shape[0])
    return [float(t) if ok else 1.0 for t, ok in zip(log_t.exp().tolist(),
                                                     informative.tolist(), strict=True)]


def _confidence_and_correct(probs: np.ndarray, targets: np.ndarray, task: str
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Per-prediction confidence and whether it was right (1.0) or not (0.0)."""
    probs = np.asarray(probs, dtype=np.float64)
    if task == "single_label":
        correct = probs.argmax(axis=1) == np.asarray(targets).astype(int)
        return probs.max(axis=1), correct.astype(np.float64)
    return probs.ravel(), (np.asarray(targets) > 0.5).astype(np.float64).ravel()


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [0, 1]: bin i holds (i/bins, (i+1)/bins], bin 0 also holds 0."""
    return np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)


def reliability(probs: np.ndarray, targets: np.ndarray, task: str, *, bins: int = ECE_BINS
                ) -> dict[str, list[float | int | None]]:
    """Reliability-diagram data: per equal-width bin its edges, count, mean confidence and
    accuracy (None for an empty bin). Single-label: top-1 confidence vs correct; multi-label:
    every (image, class) sigmoid score vs its label."""
    confidence, correct = _confidence_and_correct(probs, targets, task)
    index = _bin_index(confidence, bins)
    count = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    return {
        "lower": [i / bins for i in range(bins)],
        "upper": [(i + 1) / bins for i in range(bins)],
        "count": [int(c) for c in count],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)],
        "accuracy": [float(s / c) if c else None for s, c in zip(correct_sum, count,
                                                                  strict=True)],
    }


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, task: str, *,
                               bins: int = ECE_BINS) -> float:
    """ECE: sum over bins of (bin count / total) * |accuracy - mean confidence|."""
    diagram = reliability(probs, targets, task, bins=bins)
    total = sum(diagram["count"])  # type: ignore[arg-type]
    if not total:
        return 0.0
    return float(sum(n / total * abs(acc - conf)  # type: ignore[operator]
                     for n, acc, conf in zip(diagram["count"], diagram["accuracy"],
                                             diagram["confidence"], strict=True) if n))
