"""ImageDecoder with a device decoder: JPEGs to the device, the rest (and its refusals) to
the decode processes, results in upload order, errors and deadlines as without it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence

import pytest
import torch

from app.exceptions import DeadlineExceededError, InvalidImageError, OversizedImageError
from app.serving.imaging import ImageDecoder, Upload
from models.card import Preprocessing
from models.device_decode import DeviceJpegDecoder, DeviceResult
from models.preprocessing import EvalCrop
from tests.jpegs import corrupt_scan, jpeg_bytes, scene, with_frame_size
from tests.serving_helpers import encode

pytestmark = pytest.mark.asyncio(loop_scope="function")

PRE = Preprocessing(resize=64, crop=56)
CROP = EvalCrop(PRE)
CPU = torch.device("cpu")


class GatedDeviceDecoder(DeviceJpegDecoder):
    """The real device decoder, holding each batch until released, counting batches."""

    def __init__(self) -> None:
        super().__init__(CPU, PRE, 10**7)
        self.release = threading.Event()
        self.batches: list[int] = []

    def decode(self, images: Sequence[bytes]) -> list[DeviceResult]:
        self.batches.append(len(images))
        self.release.wait(30)
        return super().decode(images)


@pytest.fixture
def pool() -> Iterator[ImageDecoder]:
    decoder = ImageDecoder(workers=2, max_pixels=10**7)
    yield decoder
    decoder.close()


async def test_a_mixed_request_comes_back_in_upload_order(pool: ImageDecoder) -> None:
    device = DeviceJpegDecoder(CPU, PRE, 10**7)
    uploads = [Upload("a.png", encode(scene(90, 70), "PNG")),
               Upload("b.jpg", jpeg_bytes(scene(200, 150, seed=1))),
               Upload("c.jpg", jpeg_bytes(scene(120, 100, seed=2).convert("CMYK"))),
               Upload("d.jpg", jpeg_bytes(scene(300, 240, seed=3)))]
    routed = await pool.decode(uploads, CROP, timeout=30,
                               on_device=device)
    on_threads = await pool.decode(uploads, CROP, timeout=30)
    assert [image.filename for image in routed] == ["a.png", "b.jpg", "c.jpg", "d.jpg"]
    b, d = device.decode([uploads[1].data, uploads[3].data])
    assert torch.equal(routed[1].pixels, b) and torch.equal(routed[3].pixels, d)
    for index in (0, 2):  # not for the device: exactly the threads' pixels
        assert torch.equal(routed[index].pixels, on_threads[index].pixels)
    for mine, theirs in zip(routed, on_threads, strict=True):
        assert (mine.pixels.int() - theirs.pixels.int()).abs().float().mean() < 2


async def test_the_first_bad_file_in_upload_order_is_reported(pool: ImageDecoder) -> None:
    device = DeviceJpegDecoder(CPU, PRE, 10**7)
    good = jpeg_bytes(scene(200, 150))
    corrupt, broken = Upload("corrupt.jpg", corrupt_scan(good)), Upload("x.png", b"\x89PNG..")
    for uploads, named in (([Upload("ok.jpg", good), corrupt, broken], "corrupt.jpg"),
                           ([broken, Upload("ok.jpg", good), corrupt], "x.png")):
        with pytest.raises(InvalidImageError, match=named):
            await pool.decode(uploads, CROP, timeout=30,
                              on_device=device)


async def test_a_jpeg_over_max_pixels_is_refused_as_on_the_threads(pool: ImageDecoder) -> None:
    device = DeviceJpegDecoder(CPU, PRE, 10**7)
    bomb = Upload("bomb.jpg", with_frame_size(jpeg_bytes(scene(120, 90)), 30_000, 30_000))
    with pytest.raises(OversizedImageError, match="bomb.jpg"):
        await pool.decode([bomb], CROP, timeout=30,
                          on_device=device)


async def test_the_deadline_covers_the_device_and_late_batches_never_run(
        pool: ImageDecoder) -> None:
    device = GatedDeviceDecoder()
    loop = asyncio.get_running_loop()
    uploads = [Upload("a.jpg", jpeg_bytes(scene(200, 150)))]
    began = loop.time()
    try:
        with pytest.raises(DeadlineExceededError, match="decoding 1 image"):
            await pool.decode(uploads, CROP, timeout=0.3, on_device=device)
        assert loop.time() - began < 5  # answered at its deadline, the device still busy
        late = asyncio.ensure_future(pool.decode(uploads * 2, CROP, timeout=0.2,
                                                 on_device=device))
        with pytest.raises(DeadlineExceededError):
            await late
    finally:
        device.release.set()
    [image] = await pool.decode(uploads, CROP, timeout=10, on_device=device)
    assert image.pixels.shape == (3, 56, 56)
    assert device.batches == [1, 1]  # the late request's batch was dropped before it ran


async def test_a_closed_decoder_takes_no_device_work(pool: ImageDecoder) -> None:
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        await pool.decode([Upload("a.jpg", jpeg_bytes(scene(50, 40)))], CROP,
                          timeout=5, on_device=DeviceJpegDecoder(CPU, PRE, 10**7))
