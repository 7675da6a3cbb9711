"""Turning one checkpoint folder into a ServedModel: read it, build the predictor, prove it."""

from __future__ import annotations

import logging
from pathlib import Path

from app.compute import ComputeThread, name_native_thread
from app.config import Settings
from app.imaging import ImageDecoder
from app.metrics import Metrics
from app.served_model import ServedModel
from models import checkpoint
from models.device import Accelerator
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


class ModelLoader:
    """Builds served models with the service's settings, device, decoder and compute thread."""

    def __init__(self, settings: Settings, *, accelerator: Accelerator, decoder: ImageDecoder,
                 metrics: Metrics, compute: ComputeThread) -> None:
        self.settings = settings
        self.accelerator = accelerator
        self.decoder = decoder
        self.metrics = metrics
        self.compute = compute

    def load(self, name: str, path: Path) -> ServedModel:
        """Load, warm up and check one checkpoint (call on a thread that exits afterwards,
        see app.compute); raises CheckpointError or BackendError naming what failed."""
        model, card = checkpoint.load(path)
        if self.settings.backend == "onnxruntime":
            # ONNX Runtime starts its worker pool on this thread and keeps it for the batches:
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
        logger.info("model %s loaded from %s (%s, %s, %d classes) on %s, %s, %s", name, path,
                    card.arch, card.task, card.num_classes, self.accelerator.describe(),
                    self.accelerator.precision_name, predictor.backend)
        return ServedModel(name=name, card=card, predictor=predictor, decoder=self.decoder,
                           settings=self.settings, on_event=self.metrics.batcher_hook(name),
                           compute=self.compute)
