"""Explaining crops: batch them through the CAM explainer, draw each heatmap (the crops come
from ServedModel.crops, the same step /predict takes).

Explain work has a DynamicBatcher of its own, on the same compute thread as the model's
prediction batches. A separate batcher because its batch function answers maps, not the
outputs every predict and OIP caller of the model's batcher relies on, and mixing the two in
one queue would make every prediction batch carry the explainer's extra work. The same
compute thread because both run the same layers on the same device: batches of either kind
run one at a time, never competing for the accelerator, and an explain request cannot slow
predictions more than one batch at a time. Its queue is bounded by its own `max_queue`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from app.config import Settings
from app.serving.batching import DynamicBatcher, EventHook
from app.serving.compute import ComputeThread
from app.serving.imaging import DecodedImage
from models.cam import Explainer, Explanation
from models.heatmap import heatmap_png

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplainedImage:
    """One upload's explained class, its score, and the heatmap PNG over its crop."""

    filename: str
    label: str
    score: float
    png: bytes


class ExplainQueue:
    """One model's explain batcher and the steps around it."""

    def __init__(self, explainer: Explainer, *, name: str, settings: Settings,
                 compute: ComputeThread | None = None,
                 on_event: EventHook | None = None) -> None:
        self.explainer = explainer
        self.classes = explainer.card.classes
        self.batcher = DynamicBatcher(
            explainer.run_batch, max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
            name=f"{name}-explain", compute=compute, on_event=on_event)

    def start(self) -> None:
        """Start the batcher's worker (on the event loop)."""
        self.batcher.start()

    async def stop(self, timeout: float) -> None:
        """Finish what is queued (bounded), then stop."""
        await self.batcher.stop(timeout)

    async def explain(self, images: list[DecodedImage], *, timeout: float,
                      class_index: int | None = None) -> list[ExplainedImage]:
        """Each crop's map for `class_index` (None: its top class), within `timeout` s."""
        found = await self.batcher.submit([(image.pixels, class_index) for image in images],
                                          timeout=timeout)
        # PNG encoding takes milliseconds per image: off the event loop
        return await asyncio.to_thread(self._draw, images, found)

    def _draw(self, images: list[DecodedImage],
              found: list[Explanation]) -> list[ExplainedImage]:
        return [ExplainedImage(image.filename, self.classes[e.class_index], e.score,
                               heatmap_png(image.pixels.cpu(), e.cam))
                for image, e in zip(images, found, strict=True)]
