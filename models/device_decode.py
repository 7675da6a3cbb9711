"""Decoding a batch of JPEGs on a model's device (nvJPEG on CUDA) to the eval crop.

Only what the device decodes exactly as the host would is sent there: baseline or progressive
JPEG with three colour components, a complete stream (ends with its end-of-image marker),
a frame within `max_pixels`. Everything else, and any image the device fails on, comes back
as a `CpuFallback`, for the host path (models.decoding) to decode or to refuse with its own
error. The header is read before any pixel is decoded; EXIF orientation is applied as
models.decoding applies it; resize and centre crop follow models.preprocessing's
ResizeCenterCrop, strip rule included. The same code runs on the CPU, where it is tested.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import ExifTags, Image
from torch.nn import functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from models.card import Preprocessing
from models.decoding import reduced_scale
from models.preprocessing import MAX_ENLARGED_ASPECT

logger = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
_END_OF_IMAGE = b"\xff\xd9"
_FORMATS = ("JPEG", "MPO")  # MPO: a phone camera's JPEG with more frames after the first
# nearest is left to the host: PIL's and torch's pick different source pixels
INTERPOLATIONS = ("bilinear", "bicubic")


class DeviceDecodeError(RuntimeError):
    """The device cannot decode JPEGs, or not for this preprocessing (checked at load)."""


@dataclass(frozen=True)
class CpuFallback:
    """This image is for the host path; `reason` says why (for logs and tests)."""

    reason: str


DeviceResult = torch.Tensor | CpuFallback


def is_jpeg(data: bytes) -> bool:
    """True when the bytes start like a JPEG (SOI followed by a marker)."""
    return data[:3] == JPEG_MAGIC


class DeviceJpegDecoder:
    """JPEG bytes -> uint8 CHW eval crops (on the host), decoded and resized on `device`."""

    def __init__(self, device: torch.device, preprocessing: Preprocessing,
                 max_pixels: int) -> None:
        if preprocessing.interpolation not in INTERPOLATIONS:
            raise DeviceDecodeError(f"{preprocessing.interpolation} interpolation is done on "
                                    f"the host (the device does {', '.join(INTERPOLATIONS)})")
        self.device = device
        self.resize, self.crop = preprocessing.resize, preprocessing.crop
        self.mode = preprocessing.interpolation
        self.max_pixels = max_pixels

    def decode(self, images: Sequence[bytes]) -> list[DeviceResult]:
        """One request's images: a crop for each decoded here, a CpuFallback for the rest."""
        probes = [self._probe(data) for data in images]
        results: list[DeviceResult] = [p if isinstance(p, CpuFallback) else _PENDING
                                       for p in probes]
        eligible = [(i, p) for i, p in enumerate(probes) if isinstance(p, _Header)]
        decoded = self._decode_batch([images[i] for i, _ in eligible])
        crops: dict[int, torch.Tensor] = {}
        for (index, header), pixels in zip(eligible, decoded, strict=True):
            if pixels is None:
                results[index] = CpuFallback("device decode failed")
                continue
            try:
                image = _orient(self._reduce(pixels), header.orientation)
                crops[index] = self._crop(image)
            except (RuntimeError, ValueError) as exc:  # out of memory, say: the host can do it
                logger.warning("resizing on %s failed, using the host: %s", self.device, exc)
                results[index] = CpuFallback("device resize failed")
        if crops:  # one copy back for the whole request
            host = torch.stack(list(crops.values())).cpu()
            for index, crop in zip(crops, host.unbind(0), strict=True):
                results[index] = crop
        return results

    def warm_up(self) -> None:
        """Decode a small JPEG once (starting the device's decoder); DeviceDecodeError when
        the device cannot decode JPEGs."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 30, 200)).save(buffer, "JPEG")
        result = self.decode([buffer.getvalue()])[0]
        if isinstance(result, CpuFallback):
            raise DeviceDecodeError(f"cannot decode JPEGs on {self.device}: {result.reason}")

    def _probe(self, data: bytes) -> _Header | CpuFallback:
        """What the header says, or why this image is not for the device (nothing decoded)."""
        if not is_jpeg(data):
            return CpuFallback("not a JPEG")
        if not data.endswith(_END_OF_IMAGE):
            return CpuFallback("incomplete JPEG stream")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=_FORMATS) as img:
                    width, height = img.size
                    mode, orientation = img.mode, img.getexif().get(ExifTags.Base.Orientation, 1)
                    progressive = bool(img.info.get("progressive"))
        except Image.DecompressionBombError:  # Pillow's own limit: the host says 413 too
            return CpuFallback("over max_pixels")
        except Exception as exc:  # noqa: BLE001 - the host path reports it properly
            return CpuFallback(f"unreadable header: {type(exc).__name__}")
        if mode != "RGB":
            return CpuFallback(f"colour mode {mode}")
        if progressive:  # its scans are counted and its cost bounded in a decode process
            return CpuFallback("progressive JPEG")
        if width * height > self.max_pixels:
            # the host path refuses it, or decodes it at a reduced scale that fits
            return CpuFallback("over max_pixels")
        return _Header(orientation)

    def _decode_batch(self, images: list[bytes]) -> list[torch.Tensor | None]:
        """All images in one device call; if it fails, each alone (None: failed alone too)."""
        if not images:
            return []
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError as exc:
            logger.debug("batch of %d JPEGs failed on %s (%s); decoding each alone",
                         len(tensors), self.device, exc)
        return [self._decode_one(tensor) for tensor in tensors]

    def _decode_one(self, tensor: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg([tensor], mode=ImageReadMode.RGB, device=self.device)[0]
        except RuntimeError as exc:
            logger.debug("JPEG failed on %s: %s", self.device, exc)
            return None

    def _reduce(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 CHW -> float NCHW, averaged down by the scale the host decodes this JPEG at
        (models.decoding.reduced_scale), which keeps the two paths' pixels close."""
        height, width = pixels.shape[-2:]
        image = pixels.unsqueeze(0).float()
        scale = reduced_scale(width, height, self.resize)
        return F.avg_pool2d(image, scale, ceil_mode=True) if scale > 1 else image

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        """float NCHW image -> uint8 CHW crop x crop, as ResizeCenterCrop gives on the host."""
        height, width = image.shape[-2:]
        new_w, new_h = _resized(width, height, self.resize)
        if min(new_w, new_h) < self.crop or self.resize > min(width, height):
            image = _centre_of_strip(image)  # enlarging or padding: the strip rule
            height, width = image.shape[-2:]
            new_w, new_h = _resized(width, height, self.resize)
        if (new_h, new_w) != (height, width):
            image = F.interpolate(image, size=(new_h, new_w), mode=self.mode,
                                  align_corners=False, antialias=True)
        image = TF.center_crop(image, [self.crop, self.crop])
        return image.round_().clamp_(0, 255).to(torch.uint8)[0]


@dataclass(frozen=True)
class _Header:
    """What the device needs from a JPEG's header."""

    orientation: int


_PENDING = CpuFallback("not decoded")  # a placeholder, replaced before `decode` returns


def _resized(width: int, height: int, resize: int) -> tuple[int, int]:
    """The size with the shorter side at `resize`, as ResizeCenterCrop computes it."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def _orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (2..8) to an image, as PIL's exif_transpose does."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-2, -1)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-2, -1)
    if orientation == 6:
        return pixels.rot90(-1, (-2, -1))
    if orientation == 7:
        return pixels.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return pixels.rot90(1, (-2, -1))
    return pixels


def _centre_of_strip(pixels: torch.Tensor) -> torch.Tensor:
    """The centred part whose long side is at most MAX_ENLARGED_ASPECT x the short side
    (as models.preprocessing cuts a strip before enlarging it)."""
    height, width = pixels.shape[-2:]
    keep = MAX_ENLARGED_ASPECT * min(width, height)
    if width > keep:
        left = (width - keep) // 2
        return pixels[..., left:left + keep]
    if height > keep:
        top = (height - keep) // 2
        return pixels[..., top:top + keep, :]
    return pixels
