"""ServedModel: one loaded checkpoint serving requests, its stages named in the order they run.

    read_uploads (app.api.transport)       HTTP body -> list[Upload]
    decode       (app.imaging)             Upload -> DecodedImage (filename + uint8 crop)
    batch        (app.batching)            images of many requests -> one batch
    predict      (Predictor.run_batch)     uint8 batch -> probabilities, on the compute thread
    label        (Predictor.postprocess)   one image's probabilities -> its labels
    respond      (app.api.predict)         ClassifiedImage -> JSON

The batcher is given the predictor's batch function and holds nothing of this object, so a
retired version is freed as soon as its requests have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from app.batching import DynamicBatcher
from app.cluster import SharedQueueBound
from app.compute import ComputeThread
from app.config import Settings
from app.imaging import ImageDecoder, Upload
from models.card import ModelCard
from models.device_decode import DeviceJpegDecoder
from models.predict import ImageResult, Predictor
from models.preprocessing import Transform, eval_transform

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifiedImage:
    """One uploaded image's answer, under the filename it was sent with."""

    filename: str
    result: ImageResult


class ServedModel:
    """A loaded checkpoint with its transform, predictor and batcher."""

    def __init__(self, *, name: str, card: ModelCard, predictor: Predictor,
                 decoder: ImageDecoder, settings: Settings,
                 on_event: Callable[[str, int], None] | None = None,
                 compute: ComputeThread | None = None,
                 queue_bound: SharedQueueBound | None = None,
                 device_decoder: DeviceJpegDecoder | None = None) -> None:
        self.name = name
        self.card = card
        self.predictor = predictor
        self.transform: Transform = eval_transform(card.preprocessing)
        self.loaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._decoder = decoder
        self.device_decoder = device_decoder  # None: every image on the decode threads
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.batcher = DynamicBatcher(
            predictor.run_batch, max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, name=name,
            on_event=on_event, compute=compute, bound=queue_bound)

    def start(self) -> None:
        """Start the batcher's worker (on the event loop)."""
        self.batcher.start()

    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedModel]:
        """Hold the model for one request; retiring waits for every lease to end."""
        self._leases += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._leases -= 1
            if self._leases == 0:
                self._idle.set()

    async def classify(self, uploads: list[Upload], *, timeout: float, top_k: int = 5,
                       threshold: float | None = None, all_scores: bool = False
                       ) -> list[ClassifiedImage]:
        """Decode, batch, predict and label one request's images within `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self.batcher.reserve(len(uploads)):  # admission before any decoding is spent
            images = await self._decoder.decode(
                uploads, self.transform, target_size=self.card.preprocessing.resize,
                timeout=timeout,  # the request's deadline covers decoding too
                on_device=self.device_decoder)
        rows = await self.batcher.submit([image.pixels for image in images],
                                         timeout=max(1e-3, deadline - loop.time()))
        # one image at a time: torch parallelises ops on larger tensors, and the event loop
        # must not start an OpenMP team of its own (see app.compute)
        return [ClassifiedImage(image.filename, self.predictor.postprocess(
                    row.unsqueeze(0), top_k=top_k, threshold=threshold,
                    all_scores=all_scores)[0])
                for image, row in zip(images, rows, strict=True)]

    async def retire(self, timeout: float) -> None:
        """Wait (bounded) for requests holding this model, then drain and stop the batcher."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("model %s: %d requests still running after %g s; stopping anyway",
                           self.name, self._leases, timeout)
        await self.batcher.stop(timeout)
