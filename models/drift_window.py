"""DriftWindow: the bins of the last images a model answered, and their PSI against the
reference in its card (models.drift).

Memory is bounded: one small integer per image and quantity for the last `size` images, and
the bin counts, kept up to date as images come and go, so the figures cost a pass over the
bins, never over the images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.drift import bin_indices, class_bins, psi

WINDOW_IMAGES = 1000  # the recent images compared with the reference
MIN_WINDOW_IMAGES = 200  # fewer than this and the figures are mostly noise: none reported


class DriftWindow:
    """The last `size` images' bins per quantity; `psi()` once it holds `min_images`."""

    def __init__(self, reference: dict[str, Any], *, unknown: bool,
                 size: int = WINDOW_IMAGES, min_images: int = MIN_WINDOW_IMAGES) -> None:
        """`reference`: a card's valid `drift` field; `unknown`: whether the images come
        with unknown scores (the card has the rule; compared only where the reference has
        their histogram too)."""
        if not 1 <= min_images <= size:
            raise ValueError(f"need 1 <= min_images <= size, got {min_images} and {size}")
        self.size, self.min_images = size, min_images
        self._edges = {"confidence": reference["confidence"]["edges"]}
        expected = {"confidence": reference["confidence"]["counts"]}
        if unknown and reference.get("unknown_score") is not None:
            self._edges["unknown_score"] = reference["unknown_score"]["edges"]
            expected["unknown_score"] = reference["unknown_score"]["counts"]
        classes = np.asarray(reference["predicted_class"], dtype=np.int64)
        self._class_bins = class_bins(classes)
        expected["predicted_class"] = np.bincount(self._class_bins, weights=classes,
                                                  minlength=int(self._class_bins.max()) + 1)
        self._expected = {q: np.asarray(c, dtype=np.float64) for q, c in expected.items()}
        self._ring = {q: np.zeros(size, dtype=np.int16) for q in self._expected}
        self._counts = {q: np.zeros(len(c), dtype=np.int64) for q, c in self._expected.items()}
        self._next = 0  # the slot the next image goes to
        self._filled = 0

    @property
    def quantities(self) -> tuple[str, ...]:
        """The quantities compared (models.drift.QUANTITIES, those this model has)."""
        return tuple(self._expected)

    def __len__(self) -> int:
        return self._filled

    def add(self, confidence: np.ndarray, classes: np.ndarray,
            unknown: np.ndarray | None = None) -> None:
        """Take in a batch of images (models.drift.served_quantities), oldest ones out."""
        bins = {"confidence": bin_indices(confidence, self._edges["confidence"]),
                "predicted_class": self._class_bins[np.asarray(classes, dtype=np.int64)]}
        if "unknown_score" in self._edges:
            if unknown is None:
                raise ValueError("this window compares unknown scores: pass them")
            bins["unknown_score"] = bin_indices(unknown, self._edges["unknown_score"])
        count = len(bins["confidence"])
        if count >= self.size:  # the batch alone fills the window
            for q, values in bins.items():
                self._ring[q][:] = values[-self.size:]
                self._counts[q][:] = np.bincount(self._ring[q], minlength=len(self._counts[q]))
            self._next, self._filled = 0, self.size
            return
        slots = (self._next + np.arange(count)) % self.size
        held = slots[(slots < self._filled) | (self._filled == self.size)]
        for q, values in bins.items():
            size = len(self._counts[q])
            self._counts[q] -= np.bincount(self._ring[q][held], minlength=size)
            self._counts[q] += np.bincount(values, minlength=size)
            self._ring[q][slots] = values
        self._next = int((self._next + count) % self.size)
        self._filled = min(self.size, self._filled + count)

    def psi(self) -> dict[str, float]:
        """The PSI of each quantity, window against reference; empty while the window holds
        fewer than `min_images` images."""
        if self._filled < self.min_images:
            return {}
        return {q: psi(self._counts[q], self._expected[q]) for q in self._expected}
