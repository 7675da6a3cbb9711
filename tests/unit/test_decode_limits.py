"""What one image can make decoding spend: frame sizes checked first, strips, high bit depths."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from models.card import Preprocessing
from models.decoding import (
    ACCEPTED_FORMATS,
    ImageDecodeError,
    ImageTooLargeError,
    _high_depth_to_uint8,
    decode,
)
from models.preprocessing import ResizeCenterCrop, eval_transform
from tests.imagegen import ico_embedding, icon, png_bomb, strip_png


@pytest.fixture
def resized_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every output size PIL is asked to resample to (the real resize still runs)."""
    sizes: list[tuple[int, int]] = []
    real = Image.Image.resize

    def recording(self: Image.Image, size: tuple[int, int], *args: object, **kw: object):
        sizes.append(tuple(size))
        return real(self, size, *args, **kw)

    monkeypatch.setattr(Image.Image, "resize", recording)
    return sizes


@pytest.mark.parametrize("size", [(12000, 1), (1, 40000), (40000, 3), (5000, 7)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_a_strip_is_never_enlarged_whole(size: tuple[int, int], interpolation: str,
                                         resized_sizes: list[tuple[int, int]]) -> None:
    pre = Preprocessing(resize=256, crop=224, interpolation=interpolation)
    image = decode(strip_png(*size), target_size=pre.resize)
    tensor = eval_transform(pre)(image)
    assert tuple(tensor.shape) == (3, 224, 224)
    # the strip's one colour fills the crop: it was cut, not distorted
    assert tensor[0].float().mean().item() == pytest.approx(200, abs=1)
    largest = max(w * h for w, h in resized_sizes)
    assert largest <= 4 * 256 * 256, resized_sizes


def test_strips_up_to_four_to_one_keep_torchvisions_pixels() -> None:
    from torchvision.transforms import v2 as T

    rng = np.random.default_rng(5)
    img = Image.fromarray(rng.integers(0, 256, (30, 120, 3), dtype=np.uint8))
    reference = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224)])(img)
    assert np.array_equal(np.asarray(ResizeCenterCrop(256, 224)(img)), np.asarray(reference))


def test_ico_holding_a_huge_png_is_refused_before_any_pixel_is_decoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real = Image.Image.load
    monkeypatch.setattr(Image.Image, "load",
                        lambda self: loads.append(self.format) or real(self))
    data = ico_embedding(png_bomb(13000, 13000))
    with pytest.raises(ImageTooLargeError, match="13000x13000"):
        decode(data, max_pixels=40_000_000)
    assert loads == []


def test_a_real_icon_decodes() -> None:
    image = decode(icon(48))
    assert image.size == (48, 48) and image.mode == "RGB"
    assert image.getpixel((10, 10)) == (200, 40, 40)


@pytest.mark.parametrize("fmt", ["ICNS", "PPM", "TGA", "PCX", "SGI", "DDS"])
def test_formats_whose_frames_are_not_checked_are_refused(fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, fmt)
    with pytest.raises(ImageDecodeError, match="accepted: " + ", ".join(ACCEPTED_FORMATS)):
        decode(buf.getvalue())


def test_phone_mpo_photos_are_decoded_at_reduced_scale() -> None:
    img = Image.new("RGB", (1600, 1200), (10, 200, 10))
    buf = io.BytesIO()
    img.save(buf, "MPO", save_all=True, append_images=[img])
    decoded = decode(buf.getvalue(), target_size=256)
    assert min(decoded.size) >= 256 and decoded.size[0] < 1600


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depths_convert_like_float64_without_whole_image_copies(mode: str) -> None:
    rng = np.random.default_rng(1)
    shape = (2000, 2000)
    arr = {"I;16": rng.integers(0, 65536, shape, dtype=np.uint16),
           "I": rng.integers(-500, 70000, shape, dtype=np.int32),
           "F": rng.normal(3.0, 10.0, shape).astype(np.float32)}[mode]
    as64 = arr.astype(np.float64)
    if mode == "F":
        expected = np.clip((as64 - as64.min()) * (255.0 / (as64.max() - as64.min())), 0, 255)
    else:
        expected = np.clip(as64 * (255.0 / 65535.0), 0, 255)
    expected = expected.astype(np.uint8)
    del as64
    tracemalloc.start()
    try:
        out = _high_depth_to_uint8(arr, stretch=mode == "F")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(out, expected)
    # the uint8 result is 1 byte per pixel, the blocks a fixed few MB; one float64 copy of the
    # image would be 8 bytes per pixel (32 MB here)
    assert peak < arr.size + 12 * 2**20, f"{peak / arr.size:.1f} bytes per pixel"


def test_sixteen_bit_png_decodes_to_the_same_gray_as_eight_bit() -> None:
    gray8 = np.random.default_rng(2).integers(0, 256, (64, 80), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray8.astype(np.uint16) * 257).save(buf, "PNG")
    assert np.array_equal(np.asarray(decode(buf.getvalue()))[..., 0], gray8)
