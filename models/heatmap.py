"""A class activation map drawn over the crop the model saw, as a PNG.

Plain numpy, PIL and a matplotlib colormap (no pyplot, no torch ops), so it may run on any
thread without starting a torch thread pool there.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

COLORMAP = "turbo"
OPACITY = 0.45  # the heatmap's share of each blended pixel


def normalized(cam: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] (min to max); a flat map is all zeros."""
    values = np.asarray(cam, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if not np.isfinite([low, high]).all() or high - low <= 1e-12:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def upsampled(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [h, w] map in [0, 1] resized bilinearly to `size` (width, height), still in [0, 1]."""
    image = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), mode="F")
    return np.clip(np.asarray(image.resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)


def overlay(crop: np.ndarray, cam: np.ndarray, *, opacity: float = OPACITY) -> np.ndarray:
    """uint8 [H, W, 3] crop and a raw [h, w] map -> uint8 [H, W, 3] crop with the coloured
    map blended over it."""
    height, width = crop.shape[:2]
    heat = upsampled(normalized(cam), (width, height))
    colours = colormaps[COLORMAP](heat)[..., :3]  # float [H, W, 3] in [0, 1]
    blend = (1.0 - opacity) * (crop.astype(np.float32) / 255.0) + opacity * colours
    return np.clip(np.rint(blend * 255.0), 0, 255).astype(np.uint8)


def heatmap_png(crop: torch.Tensor, cam: torch.Tensor) -> bytes:
    """uint8 [3, H, W] crop (on the CPU) and its raw map -> PNG bytes of the overlay."""
    pixels = crop.numpy().transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(overlay(pixels, cam.numpy()), "RGB").save(buffer, "PNG")
    return buffer.getvalue()
