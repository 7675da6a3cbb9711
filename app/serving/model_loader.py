"""Turning one checkpoint folder into a ServedModel: read it, build the predictor, prove it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from app.config import Settings
from app.metrics import Metrics
from app.serving.compute import ComputeThread, name_native_thread
from app.serving.imaging import ImageDecoder
from app.serving.queue_bound import QueueBound
from app.serving.served_model import ServedModel
from models import checkpoint
from models.architectures import arch_spec
from models.backend_specs import backend_spec
from models.cam import CamUnsupportedError, Explainer
from models.card import ModelCard
from models.device import Accelerator
from models.device_decode import DeviceDecodeError, DeviceJpegDecoder
from models.outputs import ModelOutputError
from models.predict import Predictor

logger = logging.getLogger(__name__)


def warmup_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes to run before serving: 1, the full batch, and the powers of two between."""
    sizes = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


QueueBounds = Callable[[str, int], QueueBound]  # (model, max_queue) -> that model's bound
DECODE_START_TIMEOUT = 60  # seconds a model waits for the decode processes before serving


class ModelLoader:
    """Builds served models with the service's settings, device, decoder and compute thread."""

    def __init__(self, settings: Settings, *, accelerator: Accelerator, decoder: ImageDecoder,
                 metrics: Metrics, compute: ComputeThread,
                 queue_bounds: QueueBounds | None = None) -> None:
        self.settings = settings
        self.queue_bounds = queue_bounds  # with several workers: bounds shared by all
        self.accelerator = accelerator
        self.decoder = decoder
        self.metrics = metrics
        self.compute = compute

    def load(self, name: str, path: Path) -> ServedModel:
        """Load, warm up and check one checkpoint (call on a thread that exits afterwards,
        see app.serving.compute); raises CheckpointError or BackendError naming what failed."""
        model, card = checkpoint.load(path)
        if backend_spec(self.settings.backend).own_thread_pool:
            # the runtime starts its worker pool on this thread and keeps it for the batches:
            # the pool inherits this name, so its CPU time shows as compute, not as loading
            name_native_thread(self.compute.name)
        predictor = Predictor(model, card, self.accelerator, backend=self.settings.backend,
                              threads=self.settings.torch_threads)
        # proves the outputs are well-formed probabilities before the model is marked loaded;
        # without warm-up one image still runs, for that proof
        try:
            predictor.warmup(warmup_sizes(self.settings.max_batch_size) if self.settings.warmup
                             else [1])
        except ModelOutputError as exc:
            raise checkpoint.CheckpointError(path / checkpoint.WEIGHTS_FILE,
                                             f"failed warm-up: {exc}") from exc
        if not self.decoder.wait_started(DECODE_START_TIMEOUT):
            logger.warning("the decode processes have not started after %d s; requests wait "
                           "for them", DECODE_START_TIMEOUT)
        logger.info("model %s loaded from %s (%s, %s, %d classes) on %s, %s, %s", name, path,
                    card.arch, card.task, card.num_classes, self.accelerator.describe(),
                    self.accelerator.precision_name, predictor.backend)
        return ServedModel(name=name, card=card, predictor=predictor, decoder=self.decoder,
                           settings=self.settings, on_event=self.metrics.batcher_hook(name),
                           compute=self.compute,
                           queue_bound=self.queue_bounds(name, self.settings.max_queue)
                           if self.queue_bounds else None,
                           device_decoder=self._device_decoder(name, card),
                           explainer=self._explainer(name, predictor),
                           on_explain_event=self.metrics.batcher_hook(name, explain=True),
                           run_batch=self.metrics.drift.watch(name, card).around(
                               predictor.run_batch))

    def _explainer(self, name: str, predictor: Predictor) -> Explainer | None:
        """The class activation maps of POST /explain, on the predictor's own network;
        None (explain refused) for a network that is not GAP + linear."""
        try:
            return Explainer(predictor.network, predictor.card, self.accelerator,
                             head_name=arch_spec(predictor.card.arch).classifier)
        except CamUnsupportedError as exc:
            logger.warning("model %s cannot be explained: %s", name, exc)
            return None

    def _device_decoder(self, name: str, card: ModelCard) -> DeviceJpegDecoder | None:
        """The model's JPEG decoder on its device, when the settings and the device want one
        and it works (tried once here); None: every image in the decode processes."""
        if not self.accelerator.decodes_jpeg(self.settings.gpu_decode):
            return None
        try:
            decoder = DeviceJpegDecoder(self.accelerator.device, card.preprocessing,
                                        self.settings.max_pixels)
            decoder.warm_up()
        except DeviceDecodeError as exc:
            logger.warning("model %s: JPEGs are decoded in the decode processes: %s", name, exc)
            return None
        logger.info("model %s: JPEGs are decoded on %s", name, self.accelerator.device)
        return decoder
