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

from models.card import Preprocessing

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


# What uploads may be: the formats whose real frame size is known before any pixel is decoded
# (ICO through `_ico_frame_size`; JPEG includes the MPO files of phone cameras). Pillow's other
# formats are refused rather than trusted.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO")
_DRAFT_FORMATS = ("JPEG", "MPO")  # may be decoded at a reduced scale
_ICO_MAGIC = b"\x00\x00\x01\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           target_size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    Only `ACCEPTED_FORMATS` are read, and the size of the frame that will be decoded is checked
    against `max_pixels` before any pixel is decoded. EXIF orientation is applied, animated
    and multi-page images give their first frame, every mode (CMYK, 16-bit, palette, alpha)
    becomes 8-bit RGB. When `target_size` is given, JPEGs are decoded at a reduced scale that
    still leaves the shorter side >= target_size (much faster for photos).
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        if data.startswith(_ICO_MAGIC):
            _check_pixels(_ico_frame_size(data), max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            _check_pixels(img.size, max_pixels)
            width, height = img.size
            if target_size and img.format in _DRAFT_FORMATS \
                    and min(width, height) > 2 * target_size:
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
        raise ImageDecodeError("not a recognised image format (accepted: "
                               f"{', '.join(ACCEPTED_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError,
            KeyError, struct.error) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,}")


def _ico_frame_size(data: bytes) -> tuple[int, int]:
    """The largest real frame of an ICO file, read from each embedded PNG or DIB header.

    Pillow decodes an ICO's largest frame while opening it, and the directory's own sizes stop
    at 256: a small icon file can embed a huge PNG. So every frame's header is read first.
    """
    count = struct.unpack_from("<H", data, 4)[0]
    if count == 0:
        raise ImageDecodeError("ICO file holds no images")
    largest = (0, 0)
    for entry in range(count):
        offset = struct.unpack_from("<I", data, 6 + 16 * entry + 12)[0]
        if data[offset:offset + 8] == _PNG_MAGIC:
            width, height = struct.unpack_from(">II", data, offset + 16)  # IHDR
        else:
            width, height = struct.unpack_from("<ii", data, offset + 4)  # BITMAPINFOHEADER
            height //= 2  # a DIB's height counts the image and its AND mask
        size = (abs(width), abs(height))
        if size[0] * size[1] > largest[0] * largest[1]:
            largest = size
    return largest


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(img), stretch=img.mode == "F"),
                               "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_BLOCK_PIXELS = 1 << 20  # high bit depths are converted about a megapixel at a time


def _high_depth_to_uint8(arr: np.ndarray, *, stretch: bool) -> np.ndarray:
    """16/32-bit integer or float pixels -> uint8, one block of rows at a time.

    Integers above 255 are read as 16-bit (scaled by 255/65535); with `stretch` (float images)
    the range from the minimum to the maximum becomes 0-255. Working in blocks keeps the
    float64 arithmetic to a few megabytes instead of 8 bytes per pixel of the whole image.
    """
    out = np.empty(arr.shape, dtype=np.uint8)
    if not arr.size:
        return out
    lo, hi = float(arr.min()), float(arr.max())
    if stretch:
        offset, scale = lo, (255.0 / (hi - lo) if hi > lo else 1.0)
    else:
        offset, scale = 0.0, (255.0 / 65535.0 if hi > 255 else 1.0)
    rows = max(1, _BLOCK_PIXELS // max(1, arr.shape[1]))
    work = np.empty((min(rows, arr.shape[0]), *arr.shape[1:]), dtype=np.float64)
    for top in range(0, arr.shape[0], rows):
        source = arr[top:top + rows]
        block = work[:len(source)]
        np.copyto(block, source)
        block -= offset
        block *= scale
        out[top:top + rows] = np.clip(block, 0, 255, out=block)
    return out


MAX_ENLARGED_ASPECT = 4  # a strip longer than this is cut to its centre before enlarging


class ResizeCenterCrop:
    """Resize the shorter side to `resize`, then take the centred `crop` x `crop` square.

    The same pixels as torchvision's Resize(resize, antialias=True) + CenterCrop(crop) on a PIL
    image (within one level of rounding), but when shrinking only the cropped region is
    resampled: one PIL resize of that box of the source straight to the crop size, about half
    the work. Enlarging, or a crop larger than the resized image, goes through torchvision,
    after cutting a strip longer than `MAX_ENLARGED_ASPECT`:1 to its centre: enlarging a
    12000x1 strip whole would mean resampling gigapixels to keep a 224-pixel square of it.
    So the work never exceeds about `MAX_ENLARGED_ASPECT` x resize^2 pixels, whatever the shape.
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
            # torchvision's way, on no more of a strip than can be seen after the crop
            return self._fallback(_centre_of_strip(img, MAX_ENLARGED_ASPECT))
        top = int(round((new_h - self.crop) / 2.0))
        left = int(round((new_w - self.crop) / 2.0))
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        return img.resize((self.crop, self.crop), self._filter, box=box)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(resize={self.resize}, crop={self.crop}, "
                f"interpolation={self.interpolation!r})")


def _centre_of_strip(img: Image.Image, max_aspect: int) -> Image.Image:
    """The centred part of `img` whose long side is at most `max_aspect` x its short side.

    Resizing keeps the short side, and the centre crop is never longer than the short side
    once resized, so what is cut lies well outside anything the crop keeps.
    """
    width, height = img.size
    short = min(width, height)
    keep = max_aspect * short
    if max(width, height) <= keep:
        return img
    if width > height:
        left = (width - keep) // 2
        return img.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return img.crop((0, top, width, top + keep))


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
