"""ServedModel: one loaded checkpoint serving requests, its stages named in the order they run.

    read_uploads (app.api.transport)       HTTP body -> list[Upload]
    decode       (app.imaging)             Upload -> DecodedImage (filename + uint8 crop)
    batch        (app.batching)            images of many requests -> one batch
    predict      (Predictor.run_batch)     uint8 batch -> logits, on the compute thread
    label        (Predictor.answer)        one image's logits -> its scores, labels, unknown
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

import numpy as np
import torch

from app.batching import DynamicBatcher
from app.cluster import SharedQueueBound
from app.compute import ComputeThread
from app.config import Settings
from app.explaining import ExplainQueue
from app.imaging import ImageDecoder, Upload
from models.cam import Explainer
from models.card import ModelCard
from models.device_decode import DeviceJpegDecoder
from models.pixels import crops_from_channels_last, crops_from_normalized
from models.predict import ImageResult, Predictor
from models.preprocessing import EvalCrop

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
                 device_decoder: DeviceJpegDecoder | None = None,
                 explainer: Explainer | None = None,
                 on_explain_event: Callable[[str, int], None] | None = None) -> None:
        self.name = name
        self.card = card
        self.predictor = predictor
        self.crop = EvalCrop(card.preprocessing)  # what the decode processes run
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
        # POST /explain: a batcher of its own on the same compute thread (app.explaining)
        self.explaining = None if explainer is None else ExplainQueue(
            explainer, name=name, decoder=decoder, crop=self.crop,
            settings=settings, compute=compute, on_event=on_explain_event)

    def start(self) -> None:
        """Start the batchers' workers (on the event loop)."""
        self.batcher.start()
        if self.explaining is not None:
            self.explaining.start()

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
                       threshold: float | None = None, all_scores: bool = False,
                       reject_unknown: bool = False) -> list[ClassifiedImage]:
        """Decode, batch, predict and label one request's images within `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self.batcher.reserve(len(uploads)):  # admission before any decoding is spent
            images = await self._decoder.decode(
                uploads, self.crop, timeout=timeout,  # the deadline covers decoding too
                on_device=self.device_decoder)
        rows = await self.batcher.submit([image.pixels for image in images],
                                         timeout=max(1e-3, deadline - loop.time()))
        # one image at a time: torch parallelises ops on larger tensors, and the event loop
        # must not start an OpenMP team of its own (see app.compute)
        return [ClassifiedImage(image.filename, self.predictor.answer(
                    row.unsqueeze(0), top_k=top_k, threshold=threshold,
                    all_scores=all_scores, reject_unknown=reject_unknown)[0])
                for image, row in zip(images, rows, strict=True)]

    async def score_uploads(self, uploads: list[Upload], *, timeout: float) -> np.ndarray:
        """Decode and batch uploads as `classify` does; the model's float32 outputs
        (Predictor.outputs: [N, C] logits, then the unknown score where the card has one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self.batcher.reserve(len(uploads)):
            images = await self._decoder.decode(
                uploads, self.crop, timeout=timeout, on_device=self.device_decoder)
        return await self._score_crops([image.pixels for image in images],
                                       timeout=max(1e-3, deadline - loop.time()))

    async def score_pixels(self, pixels: np.ndarray, *, timeout: float) -> np.ndarray:
        """uint8 [N, H, W, 3] crops (already resized and cropped) -> the model's outputs."""
        return await self._score_crops(list(crops_from_channels_last(pixels)), timeout=timeout)

    async def score_normalized(self, values: np.ndarray, *, timeout: float) -> np.ndarray:
        """float [N, 3, H, W] normalised with the card's mean/std -> the model's outputs
        (ValueError for values no 8-bit image normalises to)."""
        # off the event loop: a full batch of large crops takes tens of milliseconds
        crops = await asyncio.to_thread(crops_from_normalized, values, self.card.preprocessing)
        return await self._score_crops(list(crops), timeout=timeout)

    async def _score_crops(self, crops: list[torch.Tensor], *, timeout: float) -> np.ndarray:
        rows = await self.batcher.submit(crops, timeout=timeout)  # the batch function's outputs
        return torch.stack(rows).numpy()

    def ranked_labels(self, probs: np.ndarray, top_k: int) -> list[list[tuple[float, int, str]]]:
        """Per row of probabilities, (score, class index, label) best first: single-label
        the top `top_k`; multi-label those passing the card's thresholds, at most `top_k`."""
        index = {label: i for i, label in enumerate(self.card.classes)}
        results = self.predictor.postprocess(torch.from_numpy(probs), top_k=top_k)
        return [[(p.score, index[p.label], p.label) for p in result.predictions
                 if p.label in index][:top_k] for result in results]

    async def retire(self, timeout: float) -> None:
        """Wait (bounded) for requests holding this model, then drain and stop the batcher."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("model %s: %d requests still running after %g s; stopping anyway",
                           self.name, self._leases, timeout)
        await self.batcher.stop(timeout)
        if self.explaining is not None:
            await self.explaining.stop(timeout)
