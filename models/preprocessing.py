"""Decoding and transforms, built from a card's `Preprocessing` so serving matches training.

Transforms produce uint8 CHW tensors; normalization to float happens on the batch, on the
device (`Normalize`), which keeps host-to-device copies four times smaller.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from models.checkpoint import Preprocessing

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: larger than any phone photo, far from a bomb
_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}

Transform = Callable[[Image.Image], torch.Tensor]


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed (a decompression bomb or simply too big)."""


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           target_size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    EXIF orientation is applied, animated images give their first frame, every mode (CMYK,
    16-bit, palette, alpha) becomes 8-bit RGB. When `target_size` is given, JPEGs are decoded at
    a reduced scale that still leaves the shorter side >= target_size (much faster for photos).
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {width}x{height} = {width * height:,} pixels, "
                    f"over the limit of {max_pixels:,}")
            if target_size and img.format == "JPEG" and min(width, height) > 2 * target_size:
                img.draft(None, (target_size, target_size))
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError,
            KeyError, struct.error) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        if img.mode == "F":
            lo = arr.min()
            arr, scale = arr - lo, (255.0 / (hi - lo) if hi > lo else 1.0)
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ResizeCenterCrop:
    """Resize the shorter side to `resize`, then take the centred `crop` x `crop` square.

    The same pixels as torchvision's Resize(resize, antialias=True) + CenterCrop(crop) on a PIL
    image (within one level of rounding), but when shrinking only the cropped region is
    resampled: one PIL resize of that box of the source straight to the crop size, about half
    the work. Enlarging, or a crop larger than the resized image, goes through torchvision.
    """

    def __init__(self, resize: int, crop: int, interpolation: str = "bilinear") -> None:
        self.resize, self.crop = resize, crop
        self.interpolation = interpolation
        self._fallback = T.Compose([
            T.Resize(resize, interpolation=_INTERPOLATION[interpolation], antialias=True),
            T.CenterCrop(crop),
        ])
        self._filter = Image.Resampling[interpolation.upper()]  # the same filter, in PIL

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        if width <= height:
            new_w, new_h = self.resize, int(self.resize * height / width)
        else:
            new_w, new_h = int(self.resize * width / height), self.resize
        if min(new_w, new_h) < self.crop or self.resize > min(width, height):
            # padding the crop, or enlarging (where resampling a box differs at its edges):
            # torchvision's way
            return self._fallback(img)
        top = int(round((new_h - self.crop) / 2.0))
        left = int(round((new_w - self.crop) / 2.0))
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        return img.resize((self.crop, self.crop), self._filter, box=box)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(resize={self.resize}, crop={self.crop}, "
                f"interpolation={self.interpolation!r})")


def eval_transform(pre: Preprocessing) -> Transform:
    """Resize the shorter side, center-crop: PIL image -> uint8 CHW tensor."""
    return T.Compose([
        ResizeCenterCrop(pre.resize, pre.crop, pre.interpolation),
        T.PILToTensor(),
    ])


def train_transform(pre: Preprocessing, *, min_scale: float = 0.08, hflip: bool = True,
                    trivial_augment: bool = True, augment_probability: float = 1.0
                    ) -> Transform:
    """Random-resized crop, flip, TrivialAugmentWide: PIL image -> uint8 CHW tensor.

    `augment_probability` < 1 applies TrivialAugmentWide to only that share of the images
    (a gentler policy for short runs from scratch).
    """
    interpolation = _INTERPOLATION[pre.interpolation]
    steps: list[Callable] = [
        T.RandomResizedCrop(pre.crop, scale=(min_scale, 1.0), interpolation=interpolation,
                            antialias=True),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if trivial_augment and augment_probability > 0:
        augment = T.TrivialAugmentWide(interpolation=interpolation)
        steps.append(augment if augment_probability >= 1
                     else T.RandomApply([augment], p=augment_probability))
    steps.append(T.PILToTensor())
    return T.Compose(steps)


class Normalize(nn.Module):
    """uint8 NCHW batch -> float batch normalized with the card's mean/std."""

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() - self.mean) * self.inv_std


def load_image_file(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                    target_size: int | None = None) -> Image.Image:
    """Read and decode an image file from disk."""
    with open(path, "rb") as fh:
        return decode(fh.read(), max_pixels=max_pixels, target_size=target_size)
