"""What the server does with feedback: the store /feedback writes into (app.serving.
feedback_store), and the sampler that keeps the least-sure /predict images for review.

An image is least sure when the model flags it unknown, or when its calibrated confidence
is under `review_confidence`: for a single-label model its top score; for a multi-label
model the confidence of its least sure label, max(p, 1 - p) over the classes (how sure it is
of that label being there or not). Of those, `review_rate` are kept, at random, written off
the event loop by one thread; while `MAX_PENDING` writes wait, more are not queued (a busy
disk drops review samples, never slows /predict).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from app.config import Settings
from app.exceptions import StorageFullError
from app.serving.feedback_store import FeedbackStore
from app.serving.imaging import Upload
from app.serving.served_model import ServedModel

logger = logging.getLogger(__name__)

MAX_PENDING = 8  # review writes waiting at once, at most
SHOWN_LABELS = 3  # predictions written beside a review image


@dataclass(frozen=True)
class Feedback:
    """The feedback store (None: /feedback is off) and the review sampler (None: off)."""

    store: FeedbackStore | None
    review: ReviewSampler | None
    new_classes: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> Feedback:
        """As the settings say: nothing unless feedback_dir is set."""
        if settings.feedback_dir is None:
            return cls(None, None, False)
        store = FeedbackStore(settings.feedback_dir, quota_bytes=settings.feedback_quota_bytes,
                              review_quota_bytes=settings.review_quota_bytes)
        review = (ReviewSampler(store, rate=settings.review_rate,
                                confidence=settings.review_confidence)
                  if settings.review_rate > 0 else None)
        return cls(store, review, settings.feedback_new_classes)

    def offer(self, served: ServedModel, uploads: list[Upload], outputs: torch.Tensor) -> None:
        """Hand one /predict request's images to the review sampler, when there is one."""
        if self.review is None:
            return
        try:
            self.review.offer(served, uploads, outputs)
        except Exception:  # noqa: BLE001 - a review sample never fails the request
            logger.exception("model %s: choosing images for review failed", served.name)


def confidences(probabilities: torch.Tensor, task: str) -> torch.Tensor:
    """[N, C] calibrated scores -> [N] confidence (see the module doc)."""
    if task == "single_label":
        return probabilities.max(dim=1).values
    return torch.maximum(probabilities, 1.0 - probabilities).min(dim=1).values


class ReviewSampler:
    """Keeps a random share of the least-sure images in each model's review folder."""

    def __init__(self, store: FeedbackStore, *, rate: float, confidence: float,
                 rng: random.Random | None = None) -> None:
        self.store, self.rate, self.confidence = store, rate, confidence
        self._rng = rng or random.Random()
        self._pending = 0
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="review")

    def offer(self, served: ServedModel, uploads: list[Upload], outputs: torch.Tensor) -> int:
        """Pick among one request's images (their model outputs) those to keep, and queue
        their writes; the number queued."""
        probabilities = served.probabilities(outputs)
        sure = confidences(probabilities, served.card.task).tolist()
        unknown = served.unknown_scores(outputs)
        scores = [None] * len(uploads) if unknown is None else unknown.tolist()
        cut = served.card.unknown_threshold
        queued = 0
        for i, (upload, confidence, score) in enumerate(zip(uploads, sure, scores,
                                                            strict=True)):
            flagged = score is not None and cut is not None and score > cut
            if not (flagged or confidence < self.confidence) or self._rng.random() >= self.rate:
                continue
            ranked = served.ranked(probabilities[i:i + 1], SHOWN_LABELS)[0]
            details = {"filename": upload.filename, "confidence": confidence,
                       "unknown_score": score, "unknown": flagged if score is not None else None,
                       "predictions": [{"label": p.label, "score": p.score} for p in ranked],
                       "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            queued += self._queue(served.name, upload.data, details)
        return queued

    def _queue(self, model: str, data: bytes, details: dict) -> bool:
        with self._lock:
            if self._pending >= MAX_PENDING:
                return False
            self._pending += 1
        self._writer.submit(self._write, model, data, details)
        return True

    def _write(self, model: str, data: bytes, details: dict) -> None:
        try:
            self.store.keep_for_review(model, data, details)
        except StorageFullError as exc:
            logger.info("model %s: review image not kept: %s", model, exc)
        except Exception:  # noqa: BLE001 - a review sample never fails a request
            logger.exception("model %s: keeping a review image failed", model)
        finally:
            with self._lock:
                self._pending -= 1

    def drain(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for the writes queued so far (tests, shutdown)."""
        done = self._writer.submit(lambda: None)
        done.result(timeout)

    async def drained(self, timeout: float = 10.0) -> None:
        """`drain` without blocking the event loop."""
        await asyncio.to_thread(self.drain, timeout)
