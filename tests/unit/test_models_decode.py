"""Decoding every real-world image, and refusing every bad one, in models.decoding."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from models.card import Preprocessing
from models.decoding import ImageDecodeError, ImageTooLargeError, decode
from models.preprocessing import eval_transform
from tests.imagegen import bad_images, exif_rotated, good_images, png_bomb

GOOD = good_images()
BAD = bad_images()


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_real_world_format_decodes_to_rgb(name: str) -> None:
    img = decode(GOOD[name])
    assert img.mode == "RGB"
    assert img.width >= 1 and img.height >= 1
    tensor = eval_transform(Preprocessing.for_crop(32))(img)
    assert tensor.shape == (3, 32, 32) and str(tensor.dtype) == "torch.uint8"


@pytest.mark.parametrize("name", ["baseline.jpg", "cmyk.jpg", "rgba.png", "palette.png",
                                  "animated.gif", "image.webp", "image.tiff"])
def test_colour_survives_decoding(name: str) -> None:
    # the source images are noisy red: every colour format must keep red dominant
    r, g, b = np.asarray(decode(GOOD[name]), dtype=float).reshape(-1, 3).mean(0)
    assert r > 120 and r > g + 60 and r > b + 60, (name, r, g, b)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    arr = np.asarray(decode(GOOD["gray16.png"]), dtype=float)
    assert 40 < arr.mean() < 200  # clipping 16-bit values would give solid white


def test_animated_gif_gives_first_frame() -> None:
    arr = np.asarray(decode(GOOD["animated.gif"]), dtype=float)
    assert arr[..., 0].mean() > 120  # first frame is red, the second black


def test_exif_orientation_is_applied() -> None:
    img = decode(exif_rotated())
    assert img.size == (100, 200)
    arr = np.asarray(img, dtype=float)
    top, bottom = arr[:80].mean((0, 1)), arr[120:].mean((0, 1))
    assert top[0] > 150 and bottom[2] > 150


def test_draft_decoding_keeps_enough_resolution() -> None:
    full = decode(GOOD["baseline.jpg"])
    small = decode(GOOD["baseline.jpg"], target_size=60)
    assert min(small.size) >= 60 and small.size[0] < full.size[0]


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_bytes_raise_decode_error(name: str) -> None:
    with pytest.raises(ImageDecodeError):
        decode(BAD[name])


def test_decompression_bomb_is_refused_before_allocating() -> None:
    bomb = png_bomb()
    assert len(bomb) < 200_000
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="400,?000,?000 pixels"):
        decode(bomb)
    assert time.perf_counter() - start < 5


def test_pixel_limit_is_configurable() -> None:
    with pytest.raises(ImageTooLargeError):
        decode(GOOD["baseline.jpg"], max_pixels=1000)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1023, 767), (300, 300), (257, 1000),
                                  (224, 224), (100, 60)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_resize_center_crop_matches_torchvision(size: tuple[int, int], interpolation: str) -> None:
    from torchvision.transforms import v2 as T

    from models.preprocessing import _INTERPOLATION, ResizeCenterCrop

    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(2))  # photo-like, not white noise
    reference = T.Compose([
        T.Resize(256, interpolation=_INTERPOLATION[interpolation], antialias=True),
        T.CenterCrop(224), T.PILToTensor()])(img)
    ours = T.PILToTensor()(ResizeCenterCrop(256, 224, interpolation)(img))
    assert ours.shape == reference.shape == (3, 224, 224)
    diff = (ours.int() - reference.int()).abs()
    assert int(diff.max()) <= 1 and float(diff.float().mean()) < 0.01


def test_resize_center_crop_pads_like_torchvision_when_resize_is_below_crop() -> None:
    from torchvision.transforms import v2 as T

    from models.preprocessing import ResizeCenterCrop

    img = Image.new("RGB", (50, 40), (200, 10, 10))
    ours = T.PILToTensor()(ResizeCenterCrop(20, 32)(img))
    reference = T.PILToTensor()(T.Compose([T.Resize(20, antialias=True), T.CenterCrop(32)])(img))
    assert torch.equal(ours, reference)
