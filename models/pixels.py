"""Pixel tensors a client prepared itself, turned into the uint8 crops a Predictor takes.

A client may send what the eval transform would have made (RGB, resized and center-cropped,
uint8, channels last), or that already normalised with the card's mean and std (float,
channels first). Both become uint8 [N, 3, H, W], so they join the same batches as decoded
uploads. Normalised floats are mapped back to the 8-bit grid they came from: exact for
values made from 8-bit pixels, and within half a grey level for any other.
"""

from __future__ import annotations

import numpy as np
import torch

from models.card import Preprocessing

HALF_LEVEL = 0.5  # how far outside [0, 255] a normalised value may map before it is refused


def crops_from_channels_last(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, 3, H, W] (a copy the caller owns)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    return torch.from_numpy(np.require(pixels.transpose(0, 3, 1, 2), requirements=["C", "W"]))


def crops_from_normalized(values: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """float [N, 3, H, W] normalised as (pixel / 255 - mean) / std -> uint8 [N, 3, H, W].

    Raises ValueError for NaN or infinity, or a value that no 8-bit pixel normalises to
    (more than half a grey level outside [0, 255]). Plain numpy, so that it may run on any
    thread without starting a torch thread pool there.
    """
    if values.ndim != 4 or values.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W], got {list(values.shape)}")
    if not np.isfinite(values).all():
        raise ValueError("holds NaN or infinite values")
    scale = np.asarray(pre.std, dtype=np.float64).reshape(1, 3, 1, 1) * 255.0
    shift = np.asarray(pre.mean, dtype=np.float64).reshape(1, 3, 1, 1) * 255.0
    levels = values.astype(np.float64) * scale + shift
    low, high = float(levels.min()), float(levels.max())
    if low < -HALF_LEVEL or high > 255.0 + HALF_LEVEL:
        raise ValueError(f"holds values that map to pixel levels in [{low:.1f}, {high:.1f}], "
                         "outside [0, 255]: normalise with the model's mean and std "
                         "((pixel / 255 - mean) / std)")
    return torch.from_numpy(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
