"""DeviceJpegDecoder: the same crops as the host path, and every other image handed back to it.

Runs on the CPU device (the same code as on CUDA); one test compares CUDA with the CPU.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from models import decoding
from models.card import Preprocessing
from models.device import Accelerator
from models.device_decode import CpuFallback, DeviceDecodeError, DeviceJpegDecoder
from models.preprocessing import eval_transform
from tests.imagegen import photo
from tests.jpegs import corrupt_scan, jpeg_bytes, scene, with_frame_size

CPU = torch.device("cpu")
MAX_PIXELS = 40_000_000
PRESETS = [Preprocessing(resize=256, crop=224),
           Preprocessing(resize=232, crop=224, interpolation="bicubic"),
           Preprocessing(resize=32, crop=32)]
SIZES = [(120, 90), (300, 200), (512, 512), (1200, 900), (200, 500)]
# measured over every image below: mean <= 1.07, max <= 30 levels (the host decodes
# large JPEGs at a reduced DCT scale, the device averages the full decode down instead)
MEAN_BOUND, MAX_BOUND = 2.0, 48


def host_crop(data: bytes, pre: Preprocessing) -> torch.Tensor:
    """What the serving path's decode threads give for these bytes."""
    return eval_transform(pre)(decoding.decode(data, max_pixels=MAX_PIXELS,
                                               target_size=pre.resize))


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    d = (a.int() - b.int()).abs()
    return d.float().mean().item(), int(d.max())


def photos() -> dict[str, Image.Image]:
    skimage_data = pytest.importorskip("skimage.data")
    return {name: Image.fromarray(getattr(skimage_data, name)())
            for name in ("astronaut", "chelsea", "coffee")}


def assert_parity(device: torch.Tensor, host: torch.Tensor, what: str) -> None:
    assert device.shape == host.shape and device.dtype == torch.uint8, what
    assert device.device.type == "cpu" and device.is_contiguous(), what
    mean, worst = difference(device, host)
    assert mean < MEAN_BOUND and worst <= MAX_BOUND, f"{what}: mean {mean:.3f}, max {worst}"


@pytest.mark.parametrize("pre", PRESETS, ids=lambda p: f"{p.resize}-{p.crop}-{p.interpolation}")
def test_photos_match_the_host_path(pre: Preprocessing) -> None:
    decoder = DeviceJpegDecoder(CPU, pre, MAX_PIXELS)
    for name, source in photos().items():
        images = [jpeg_bytes(source.resize(size, Image.Resampling.BICUBIC)) for size in SIZES]
        for size, data, crop in zip(SIZES, images, decoder.decode(images), strict=True):
            assert_parity(crop, host_crop(data, pre), f"{name} {size}")


@pytest.mark.parametrize("pre", PRESETS, ids=lambda p: f"{p.resize}-{p.crop}-{p.interpolation}")
def test_scenes_match_the_host_path_and_progressive_ones_go_to_the_host(
        pre: Preprocessing) -> None:
    decoder = DeviceJpegDecoder(CPU, pre, MAX_PIXELS)
    images = [jpeg_bytes(scene(*size, seed=i)) for i, size in enumerate(SIZES)]
    for size, data, crop in zip(SIZES, images, decoder.decode(images), strict=True):
        assert_parity(crop, host_crop(data, pre), f"{size}")
    # a progressive file's scans are counted, and its cost bounded, in a decode process
    progressive = [jpeg_bytes(scene(*size, seed=i), progressive=True)
                   for i, size in enumerate(SIZES)]
    assert all(result == CpuFallback("progressive JPEG")
               for result in decoder.decode(progressive))


@pytest.mark.parametrize("size", [(4000, 60), (30, 2000), (100, 80), (1, 1)])
def test_strips_and_small_images_are_enlarged_as_on_the_host(size: tuple[int, int]) -> None:
    pre = PRESETS[0]
    data = jpeg_bytes(scene(*size))
    [crop] = DeviceJpegDecoder(CPU, pre, MAX_PIXELS).decode([data])
    assert_parity(crop, host_crop(data, pre), f"{size}")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_on_the_host(orientation: int) -> None:
    pre = Preprocessing(resize=64, crop=48)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg_bytes(scene(160, 90), exif=exif.tobytes())
    [crop] = DeviceJpegDecoder(CPU, pre, MAX_PIXELS).decode([data])
    host = host_crop(data, pre)
    assert_parity(crop, host, f"orientation {orientation}")
    if orientation > 1:  # the comparison can tell: the unrotated picture is far off
        exif[0x0112] = 1
        [plain] = DeviceJpegDecoder(CPU, pre, MAX_PIXELS).decode(
            [jpeg_bytes(scene(160, 90), exif=exif.tobytes())])
        assert difference(plain, host)[0] > 10 * MEAN_BOUND


def test_other_formats_and_modes_are_handed_to_the_host() -> None:
    img = photo((80, 60))
    cases = {
        "PNG": io.BytesIO(), "WEBP": io.BytesIO(), "GIF": io.BytesIO()}
    for fmt, buffer in cases.items():
        img.save(buffer, fmt)
    images = {fmt: buffer.getvalue() for fmt, buffer in cases.items()}
    images["gray"] = jpeg_bytes(img.convert("L"))
    images["cmyk"] = jpeg_bytes(img.convert("CMYK"))
    results = DeviceJpegDecoder(CPU, PRESETS[0], MAX_PIXELS).decode(list(images.values()))
    reasons = dict(zip(images, results, strict=True))
    assert reasons == {
        "PNG": CpuFallback("not a JPEG"), "WEBP": CpuFallback("not a JPEG"),
        "GIF": CpuFallback("not a JPEG"), "gray": CpuFallback("colour mode L"),
        "cmyk": CpuFallback("colour mode CMYK")}
    for data in images.values():  # and the host decodes every one of them
        assert host_crop(data, PRESETS[0]).shape == (3, 224, 224)


def test_truncated_and_corrupt_jpegs_fall_back_and_the_host_refuses_them() -> None:
    good = jpeg_bytes(scene(300, 200))
    truncated, corrupt = good[: len(good) // 2], corrupt_scan(good)
    results = DeviceJpegDecoder(CPU, PRESETS[0], MAX_PIXELS).decode([truncated, corrupt])
    assert results == [CpuFallback("incomplete JPEG stream"),
                       CpuFallback("device decode failed")]
    for data in (truncated, corrupt):
        with pytest.raises(decoding.ImageDecodeError):
            decoding.decode(data, target_size=256)


def test_a_bad_image_in_the_batch_does_not_stop_the_others() -> None:
    pre = PRESETS[0]
    decoder = DeviceJpegDecoder(CPU, pre, MAX_PIXELS)
    first, last = jpeg_bytes(scene(300, 200, seed=1)), jpeg_bytes(scene(640, 480, seed=2))
    results = decoder.decode([first, corrupt_scan(first), last])
    assert results[1] == CpuFallback("device decode failed")
    [alone_first, alone_last] = decoder.decode([first, last])
    assert torch.equal(results[0], alone_first) and torch.equal(results[2], alone_last)


def test_max_pixels_is_enforced_from_the_header_before_decoding() -> None:
    pre = PRESETS[0]
    small = jpeg_bytes(scene(120, 90))
    bomb = with_frame_size(small, 60_000, 60_000)  # 3.6 gigapixels, even 1/8 is over
    [result] = DeviceJpegDecoder(CPU, pre, MAX_PIXELS).decode([bomb])
    assert result == CpuFallback("over max_pixels")
    with pytest.raises(decoding.ImageTooLargeError):  # what the host makes of it: 413
        decoding.decode(bomb, max_pixels=MAX_PIXELS, target_size=pre.resize)
    # just over the limit and too small to be decoded reduced: refused the same way
    [result] = DeviceJpegDecoder(CPU, pre, 120 * 90 - 1).decode([small])
    assert result == CpuFallback("over max_pixels")
    with pytest.raises(decoding.ImageTooLargeError):
        decoding.decode(small, max_pixels=120 * 90 - 1, target_size=pre.resize)
    [crop] = DeviceJpegDecoder(CPU, pre, 120 * 90).decode([small])
    assert isinstance(crop, torch.Tensor)


def test_the_accelerator_says_where_jpegs_decode() -> None:
    cpu, cuda = Accelerator(CPU), Accelerator(torch.device("cuda"))
    assert [cpu.decodes_jpeg(s) for s in ("auto", "on", "off")] == [False, True, False]
    assert [cuda.decodes_jpeg(s) for s in ("auto", "on", "off")] == [True, True, False]
    with pytest.raises(ValueError, match="maybe"):
        cpu.decodes_jpeg("maybe")


def test_nearest_interpolation_is_left_to_the_host() -> None:
    with pytest.raises(DeviceDecodeError, match="nearest"):
        DeviceJpegDecoder(CPU, Preprocessing(interpolation="nearest"), MAX_PIXELS)


def test_warm_up_decodes_on_the_device() -> None:
    DeviceJpegDecoder(CPU, PRESETS[0], MAX_PIXELS).warm_up()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_cpu_device() -> None:
    pre = PRESETS[0]
    images = [jpeg_bytes(scene(*size, seed=i)) for i, size in enumerate(SIZES)]
    on_cuda = DeviceJpegDecoder(torch.device("cuda"), pre, MAX_PIXELS).decode(images)
    on_cpu = DeviceJpegDecoder(CPU, pre, MAX_PIXELS).decode(images)
    for size, gpu, cpu, data in zip(SIZES, on_cuda, on_cpu, images, strict=True):
        assert isinstance(gpu, torch.Tensor), (size, gpu)  # nvJPEG took every one
        assert_parity(gpu, cpu, f"cuda vs cpu {size}")
        assert_parity(gpu, host_crop(data, pre), f"cuda vs host {size}")
