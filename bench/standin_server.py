"""The real server with a stand-in model that answers fixed probabilities at once (bench only).

    python -m bench.standin_server [--fixed-crop] <the flags of python -m app>

Every stage is the service's own (HTTP, multipart, decode, resize, batching, post-processing,
JSON) except the model: the runner the Predictor builds is replaced by one that returns the
same valid probability row for every image, so what is measured is the front end alone. The
checkpoint is still read and loaded as usual. `install_standin` is the function each server
process calls first, the parent and any spawned worker alike.

With `--fixed-crop` the decode stage is taken out as well: every upload "decodes" at once, on
the event loop, to the same crop of the card's size (`install_fixed_crop`), so what is left is
the pure request path (HTTP, routing, multipart, admission, batching, answers, JSON).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from app.process.allocator import find_tcmalloc, loaded_allocator
from models.card import ModelCard
from models.device import Accelerator
from models.outputs import probabilities

logger = logging.getLogger(__name__)

_FAST_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


class FixedProbabilities:
    """A runner that answers the same logits for every image: `row` is what they score."""

    def __init__(self, card: ModelCard) -> None:
        self.logits = torch.randn(card.num_classes, generator=torch.Generator().manual_seed(0))
        self.row = probabilities(self.logits.unsqueeze(0), card.task)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> float32 [N,C]: the same logits N times (the Predictor makes
        them scores, as it does a real model's)."""
        return self.logits.expand(batch.shape[0], -1).clone()


def standin_runner(backend: str, model: nn.Module, card: ModelCard, accelerator: Accelerator,
                   *, threads: int = 0) -> FixedProbabilities:
    """What models.backends.make_runner answers, replaced: the stand-in for any backend."""
    return FixedProbabilities(card)


def install_standin() -> None:
    """Make every Predictor built in this process run the stand-in (idempotent)."""
    import models.predict

    if models.predict.make_runner is standin_runner:
        return
    models.predict.make_runner = standin_runner
    logger.warning("stand-in model installed in process %d: fixed probabilities, no inference",
                   os.getpid())


def install_fixed_crop() -> None:
    """Make every decode in this process answer one fixed crop at once (idempotent)."""
    from app.serving import imaging

    if getattr(imaging.ImageDecoder.decode, "fixed_crop", False):
        return
    crops: dict[int, torch.Tensor] = {}

    async def decode(self: imaging.ImageDecoder, uploads: list[imaging.Upload],
                     recipe: Any, *, timeout: float,
                     on_device: Any = None) -> list[imaging.DecodedImage]:
        size = recipe.preprocessing.crop
        crop = crops.get(size)
        if crop is None:
            crop = crops[size] = torch.full((3, size, size), 128, dtype=torch.uint8)
        return [imaging.DecodedImage(upload.filename, crop) for upload in uploads]

    decode.fixed_crop = True  # type: ignore[attr-defined]
    imaging.ImageDecoder.decode = decode  # type: ignore[method-assign]
    logger.warning("fixed crops installed in process %d: uploads are not decoded", os.getpid())


def install_standin_fixed_crop() -> None:
    """The stand-in model and fixed crops: each worker's entry under `--fixed-crop`."""
    install_standin()
    install_fixed_crop()


def _preload_fast_allocator(given: Sequence[str], argv: Sequence[str]) -> None:
    """Restart this module on tcmalloc when the app would: its own restart runs `-m app`,
    which would drop the stand-in."""
    from app.__main__ import parse_settings

    if (parse_settings(argv).allocator == "system" or os.environ.get("LD_PRELOAD")
            or loaded_allocator() in _FAST_ALLOCATORS):
        return
    library = find_tcmalloc()
    if library is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "bench.standin_server", *given],
                  {**os.environ, "LD_PRELOAD": library})


def main(argv: Sequence[str] | None = None) -> int:
    """Install the stand-in here (and in every worker, where the app supports it), serve."""
    given = list(sys.argv[1:] if argv is None else argv)
    args = [arg for arg in given if arg != "--fixed-crop"]
    entry = install_standin_fixed_crop if len(args) < len(given) else install_standin
    _preload_fast_allocator(given, args)
    import app.__main__ as app_main

    entry()
    if "worker_entry" in inspect.signature(app_main.main).parameters:
        return app_main.main(args, worker_entry=entry)
    return app_main.main(args)


if __name__ == "__main__":
    sys.exit(main())
