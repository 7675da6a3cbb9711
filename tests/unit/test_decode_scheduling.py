"""The decode pool: fair across requests, inside each request's deadline, nothing run for nobody."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from app.batching import DeadlineExceededError
from app.exceptions import InvalidImageError
from app.imaging import ImageDecoder, Upload
from tests.serving_helpers import png

pytestmark = pytest.mark.asyncio(loop_scope="function")

HEAVY = (64, 64)  # images of this size stand for slow decodes: they wait for `release`


class GatedTransform:
    """A real transform (PIL -> uint8 tensor) that holds HEAVY images until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        with self._lock:
            self.started.append(image.size)
        if image.size == HEAVY:
            self.release.wait(30)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def heavy_started(self) -> int:
        with self._lock:
            return self.started.count(HEAVY)


@pytest.fixture
def decoder() -> Iterator[ImageDecoder]:
    pool = ImageDecoder(workers=2, max_pixels=10**7)
    yield pool
    pool.close()


def heavy(n: int) -> list[Upload]:
    return [Upload(f"heavy{i}.png", png("red", seed=i, size=HEAVY)) for i in range(n)]


async def wait_for(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not condition():
        assert loop.time() < give_up, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_request_of_heavy_images_cannot_starve_the_next_one(
        decoder: ImageDecoder) -> None:
    gate = GatedTransform()
    big = asyncio.ensure_future(decoder.decode(heavy(4), gate, timeout=30))
    await wait_for(lambda: gate.heavy_started() >= 1)
    small = [Upload("small.png", png("blue"))]
    try:
        [image] = await asyncio.wait_for(decoder.decode(small, gate, timeout=30), 10)
        assert image.filename == "small.png" and image.pixels.shape == (3, 40, 48)
        assert not big.done() and gate.heavy_started() == decoder.share == 1
    finally:
        gate.release.set()
    assert len(await big) == 4


async def test_a_lone_request_uses_its_share_of_threads() -> None:
    pool = ImageDecoder(workers=3, max_pixels=10**7)
    gate = GatedTransform()
    try:
        work = asyncio.ensure_future(pool.decode(heavy(5), gate, timeout=30))
        await wait_for(lambda: gate.heavy_started() == 2)
        await asyncio.sleep(0.1)
        assert gate.heavy_started() == 2 == pool.share  # one thread stays free for newcomers
        gate.release.set()
        assert len(await work) == 5
    finally:
        gate.release.set()
        pool.close()


async def test_the_deadline_covers_decoding_and_unstarted_images_never_run(
        decoder: ImageDecoder) -> None:
    gate = GatedTransform()
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        with pytest.raises(DeadlineExceededError, match="decoding 4 image"):
            await decoder.decode(heavy(4), gate, timeout=0.3)
        assert loop.time() - began < 5  # answered at its deadline, not when decoding ends
    finally:
        gate.release.set()
    small = [Upload("small.png", png("green"))]
    assert len(await decoder.decode(small, gate, timeout=10)) == 1
    assert gate.heavy_started() == 1  # the other three were dropped, never decoded


async def test_after_a_bad_file_the_rest_of_the_request_is_not_decoded(
        decoder: ImageDecoder) -> None:
    gate = GatedTransform()
    uploads = [Upload("broken.png", b"not an image"), *heavy(3)]
    try:
        with pytest.raises(InvalidImageError, match="broken.png"):
            await decoder.decode(uploads, gate, timeout=30)
    finally:
        gate.release.set()
    await asyncio.sleep(0.1)
    assert gate.heavy_started() <= 1  # at most the one already running when it failed


async def test_first_bad_file_in_upload_order_is_the_one_reported(
        decoder: ImageDecoder) -> None:
    gate = GatedTransform()
    gate.release.set()
    uploads = [*heavy(1), Upload("first-bad.png", b"x"), Upload("second-bad.png", b"y")]
    with pytest.raises(InvalidImageError, match="first-bad.png"):
        await decoder.decode(uploads, gate, timeout=30)
