"""Transforms built from a card's `Preprocessing`, so serving matches training.

Decoding bytes to an image, within limits, is models.decoding.

Transforms produce uint8 CHW tensors; normalization to float happens on the batch, on the
device (`Normalize`), which keeps host-to-device copies four times smaller.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from models import decoding
from models.card import Preprocessing

logger = logging.getLogger(__name__)

_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}

Transform = Callable[[Image.Image], torch.Tensor]


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


@dataclass(frozen=True)
class EvalCrop:
    """Image bytes -> the eval crop a model sees, as uint8 HWC pixels: decoding within a pixel
    budget, then `eval_transform`'s resize and centre crop. Plain values, so it can be sent to
    the process that runs it (app.serving.decode_box)."""

    preprocessing: Preprocessing

    @property
    def output_bytes(self) -> int:
        """The size of the crop it answers."""
        return 3 * self.preprocessing.crop ** 2

    def __call__(self, data: bytes, max_pixels: int) -> np.ndarray:
        pre = self.preprocessing
        image = decoding.decode(data, max_pixels=max_pixels, target_size=pre.resize)
        crop = _resize_center_crop(pre.resize, pre.crop, pre.interpolation)(image)
        return np.asarray(crop.convert("RGB") if crop.mode != "RGB" else crop)


@functools.lru_cache(maxsize=16)
def _resize_center_crop(resize: int, crop: int, interpolation: str) -> ResizeCenterCrop:
    return ResizeCenterCrop(resize, crop, interpolation)


def crop_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HWC pixels -> the uint8 CHW tensor `eval_transform` gives (a view of a copy)."""
    return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1)


def train_transform(pre: Preprocessing, *, min_scale: float = 0.08, hflip: bool = True,
                    trivial_augment: bool = True, augment_probability: float = 1.0,
                    pad_crop: int = 0) -> Transform:
    """Random-resized crop, flip, TrivialAugmentWide: PIL image -> uint8 CHW tensor.

    `min_scale` 1 takes no random crop: the shorter side is resized to the crop and the
    centred square kept, so nothing in that square is ever cut away (multi-label labels stay
    true). `pad_crop` > 0 replaces the random resized crop with He et al.'s CIFAR augmentation:
    that square, padded with `pad_crop` black pixels on each side, then a random crop of the
    crop size. `augment_probability` < 1 applies TrivialAugmentWide to only that share of the
    images (a gentler policy for short runs from scratch).
    """
    interpolation = _INTERPOLATION[pre.interpolation]
    if pad_crop > 0:
        steps: list[Callable] = [ResizeCenterCrop(pre.crop, pre.crop, pre.interpolation),
                                 T.RandomCrop(pre.crop, padding=pad_crop, fill=0)]
    elif min_scale >= 1.0:
        steps = [ResizeCenterCrop(pre.crop, pre.crop, pre.interpolation)]
    else:
        steps = [T.RandomResizedCrop(pre.crop, scale=(min_scale, 1.0),
                                     interpolation=interpolation, antialias=True)]
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
