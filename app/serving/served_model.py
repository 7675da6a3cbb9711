"""ServedModel: one loaded checkpoint serving requests, its stages written once for every
protocol (POST /predict, the Open Inference Protocol, POST /explain).

    read the body  the route (app.api.transport, app.api.v2_codec) -> uploads or pixels
    crops          here, with app.serving.imaging: uploads -> uint8 crops within the
                   request's deadline, admitted before any decoding is spent
    outputs        here, with app.serving.batching: crops of many requests -> one batch ->
                   Predictor outputs ([N, C] logits, then the unknown score)
    answers        here, with the Predictor: outputs -> probabilities, unknown verdicts,
                   ranked (index, label, score) per image
    encode         the route -> its protocol's answer

The batcher is given the predictor's batch function and holds nothing of this object, so a
retired version is freed as soon as its requests have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import numpy as np
import torch

from app.config import Settings
from app.serving.batching import DynamicBatcher
from app.serving.compute import ComputeThread
from app.serving.explaining import ExplainedImage, ExplainQueue
from app.serving.imaging import DecodedImage, ImageDecoder, Upload
from app.serving.queue_bound import QueueBound
from models.cam import Explainer
from models.card import ModelCard
from models.device_decode import DeviceJpegDecoder
from models.pixels import crops_from_channels_last, crops_from_normalized
from models.predict import ImageResult, Prediction, Predictor
from models.preprocessing import EvalCrop

logger = logging.getLogger(__name__)


class ServedModel:
    """A loaded checkpoint with its crop recipe, predictor and batchers."""

    def __init__(self, *, name: str, card: ModelCard, predictor: Predictor,
                 decoder: ImageDecoder, settings: Settings,
                 on_event: Callable[[str, int], None] | None = None,
                 compute: ComputeThread | None = None,
                 queue_bound: QueueBound | None = None,
                 device_decoder: DeviceJpegDecoder | None = None,
                 explainer: Explainer | None = None,
                 on_explain_event: Callable[[str, int], None] | None = None,
                 run_batch: Callable[[list[torch.Tensor]], torch.Tensor] | None = None) -> None:
        self.name = name
        self.card = card
        self.predictor = predictor
        self.crop = EvalCrop(card.preprocessing)  # what the decode processes run
        self.loaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._decoder = decoder
        self.device_decoder = device_decoder  # None: every image in the decode processes
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.batcher = DynamicBatcher(  # `run_batch`: the predictor's, observed for drift
            run_batch or predictor.run_batch, max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, name=name,
            on_event=on_event, compute=compute, bound=queue_bound)
        # POST /explain: a batcher of its own on the same compute thread (app.serving.explaining)
        self.explaining = None if explainer is None else ExplainQueue(
            explainer, name=name, settings=settings, compute=compute,
            on_event=on_explain_event)

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

    # ---- crops -------------------------------------------------------------------------

    async def crops(self, uploads: list[Upload], *, deadline: float,
                    queue: DynamicBatcher | None = None) -> list[DecodedImage]:
        """The uploads decoded to the model's crops by `deadline` (the loop's clock), on the
        device where it decodes JPEGs, else in the decode processes; admitted to `queue`
        (default: the prediction batcher) before any decoding is spent (429 when full)."""
        queue = self.batcher if queue is None else queue
        with queue.reserve(len(uploads)):
            return await self._decoder.decode(uploads, self.crop, timeout=_left(deadline),
                                              on_device=self.device_decoder)

    def crops_from_pixels(self, pixels: np.ndarray) -> list[torch.Tensor]:
        """uint8 [N, H, W, 3] crops (already resized and cropped) as the model's crops."""
        return list(crops_from_channels_last(pixels))

    async def crops_from_normalized(self, values: np.ndarray) -> list[torch.Tensor]:
        """float [N, 3, H, W] normalised with the card's mean/std, back to the uint8 crops
        (ValueError for values no 8-bit image normalises to)."""
        # off the event loop: a full batch of large crops takes tens of milliseconds
        return list(await asyncio.to_thread(crops_from_normalized, values,
                                            self.card.preprocessing))

    # ---- outputs and answers -----------------------------------------------------------

    async def outputs(self, images: list[Upload] | list[torch.Tensor], *,
                      timeout: float) -> torch.Tensor:
        """The model's float32 outputs for uploads (decoded first) or crops, within `timeout`
        s: [N, C] logits, then each image's unknown score where the card has the rule."""
        deadline = asyncio.get_running_loop().time() + timeout
        if images and isinstance(images[0], Upload):
            crops = [image.pixels for image in await self.crops(images, deadline=deadline)]
        else:
            crops = images  # type: ignore[assignment]
        rows = await self.batcher.submit(crops, timeout=_left(deadline))
        return torch.stack(rows)

    def answers(self, outputs: torch.Tensor, *, top_k: int = 5, threshold: float | None = None,
                all_scores: bool = False, reject_unknown: bool = False) -> list[ImageResult]:
        """One ImageResult per row of outputs: calibrated scores, the labels passing (top-k
        or the thresholds, each with its class index) and the unknown verdict."""
        # one image at a time: torch parallelises ops on larger tensors, and the event loop
        # must not start an OpenMP team of its own (see app.serving.compute)
        return [self.predictor.answer(row.unsqueeze(0), top_k=top_k, threshold=threshold,
                                      all_scores=all_scores, reject_unknown=reject_unknown)[0]
                for row in outputs]

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """[N, C] calibrated scores (softmax or sigmoid of logits / temperature)."""
        return self.predictor.scores(outputs)

    def unknown_scores(self, outputs: torch.Tensor) -> torch.Tensor | None:
        """[N] unknown scores, None for a card without the rule."""
        return self.predictor.unknown_scores(outputs)

    def ranked(self, probabilities: torch.Tensor, top_k: int) -> list[list[Prediction]]:
        """Per row, the best labels first: single-label the top `top_k`; multi-label those
        passing the card's thresholds, at most `top_k`."""
        return [result.predictions[:top_k]
                for result in self.predictor.postprocess(probabilities, top_k=top_k)]

    async def explain(self, uploads: list[Upload], *, timeout: float,
                      class_index: int | None = None) -> list[ExplainedImage]:
        """Each upload's class activation map for `class_index` (None: its top class), from
        the same crops /predict would classify, within `timeout` s."""
        if self.explaining is None:
            raise RuntimeError(f"model {self.name} cannot be explained")
        deadline = asyncio.get_running_loop().time() + timeout
        images = await self.crops(uploads, deadline=deadline, queue=self.explaining.batcher)
        return await self.explaining.explain(images, timeout=_left(deadline),
                                             class_index=class_index)

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


def _left(deadline: float) -> float:
    """Seconds until `deadline` on the running loop's clock (never quite zero)."""
    return max(1e-3, deadline - asyncio.get_running_loop().time())
