"""A decode that the test holds open: it runs in the real decode processes, so the gate is a
file, and what it started is counted by the files it leaves."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import decoding
from models.preprocessing import EvalCrop

HEAVY = (64, 64)  # images of this size stand for slow decodes: they wait for the gate


@dataclass(frozen=True)
class GatedRecipe:
    """A real decode that records each image it starts (a file in `folder`) and holds HEAVY
    images until the file `release` appears there; then `inner`'s crop, or the image."""

    folder: str
    inner: EvalCrop | None = None

    @property
    def output_bytes(self) -> int:
        return 3 * HEAVY[0] * HEAVY[1] if self.inner is None else self.inner.output_bytes

    def __call__(self, data: bytes, max_pixels: int) -> np.ndarray:
        image = decoding.decode(data, max_pixels=max_pixels)
        Path(self.folder, f"started-{image.width}x{image.height}-{uuid.uuid4().hex}").touch()
        give_up = time.monotonic() + 30
        while image.size == HEAVY and time.monotonic() < give_up \
                and not Path(self.folder, "release").exists():
            time.sleep(0.005)
        return np.asarray(image) if self.inner is None else self.inner(data, max_pixels)


class Gate:
    """The test's side of a GatedRecipe."""

    def __init__(self, folder: Path, inner: EvalCrop | None = None) -> None:
        self.folder = folder
        self.recipe = GatedRecipe(str(folder), inner)

    def release(self) -> None:
        (self.folder / "release").touch()

    def heavy_started(self) -> int:
        return len(list(self.folder.glob(f"started-{HEAVY[0]}x{HEAVY[1]}-*")))
