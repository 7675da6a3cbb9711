"""A generated, learnable dataset: light shapes of random hue, size and place on noisy dark
backgrounds.

The class is the shape, never the colour, so mean colour alone does not separate classes.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, TASK_FLAGS, SynthConfig
from training.exceptions import ConfigError

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1
Colour = tuple[int, ...]


def _ellipse(draw: ImageDraw.ImageDraw, box: Box, colour: Colour) -> None:
    draw.ellipse(box, fill=colour)


def _square(draw: ImageDraw.ImageDraw, box: Box, colour: Colour) -> None:
    draw.rectangle(box, fill=colour)


def _triangle(draw: ImageDraw.ImageDraw, box: Box, colour: Colour) -> None:
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _cross(draw: ImageDraw.ImageDraw, box: Box, colour: Colour) -> None:
    x0, y0, x1, y1 = box
    w = (x1 - x0) / 3.5
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.rectangle((cx - w / 2, y0, cx + w / 2, y1), fill=colour)
    draw.rectangle((x0, cy - w / 2, x1, cy + w / 2), fill=colour)


def _ring(draw: ImageDraw.ImageDraw, box: Box, colour: Colour) -> None:
    draw.ellipse(box, outline=colour, width=max(2, round((box[2] - box[0]) / 6)))


def _stripes(draw: ImageDraw.ImageDraw, box: Box, colour: Colour) -> None:
    x0, y0, x1, y1 = box
    step = (x1 - x0) / 5
    for i in range(0, 5, 2):
        draw.rectangle((x0 + i * step, y0, x0 + (i + 1) * step, y1), fill=colour)


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, Box, Colour], None]] = {
    "circle": _ellipse, "square": _square, "triangle": _triangle,
    "cross": _cross, "ring": _ring, "stripes": _stripes,
}
SUPERSAMPLE = 4


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.integers(0, 110, 3), rng.integers(0, 110, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    grad = a * (1 - t) + b * t
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    img = np.broadcast_to(grad, (size, size, 3)) + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, ...]:
    """A light colour of random hue: always readable against the dark background."""
    colour = rng.integers(150, 256, 3)
    colour[rng.integers(0, 3)] = rng.integers(60, 256)  # vary the hue, keep it bright overall
    return tuple(int(v) for v in colour)


def render(shapes: list[str], *, size: int, rng: np.random.Generator) -> Image.Image:
    """One image with each named shape at a random place, scale and colour."""
    background = _background(rng, size)
    big = size * SUPERSAMPLE
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    scale_hi = 0.8 if len(shapes) == 1 else 0.5
    for name in shapes:
        side = big * rng.uniform(0.5, scale_hi)
        x0 = rng.uniform(0, big - side)
        y0 = rng.uniform(0, big - side)
        aspect = rng.uniform(0.8, 1.25)
        h = min(side * aspect, big - y0)
        SHAPES[name](draw, (x0, y0, x0 + side, y0 + h), (*_contrasting_colour(rng, background),
                                                          255))
    layer = layer.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
    base = Image.fromarray(background.astype(np.uint8)).resize((big, big), Image.NEAREST)
    base = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    return base.resize((size, size), Image.LANCZOS)


def _class_count(cfg: SynthConfig) -> int:
    """Refuse values that would write something other than asked; the number of classes."""
    fewest = 2 if cfg.task == "single" else 1
    count = len(SHAPES) if cfg.classes is None else cfg.classes
    problems = []
    if cfg.task not in TASK_FLAGS:
        problems.append(f"--task must be single or multi, got {cfg.task!r}")
    if not MIN_IMAGE_SIZE <= cfg.size <= MAX_IMAGE_SIZE:
        problems.append(f"--size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {cfg.size}")
    if cfg.per_class < 1:
        problems.append(f"--per-class must be at least 1, got {cfg.per_class}")
    if not fewest <= count <= len(SHAPES):
        problems.append(f"--classes must be in [{fewest}, {len(SHAPES)}] for --task {cfg.task} "
                        f"(there are {len(SHAPES)} shapes), got {count}")
    if problems:
        raise ConfigError("; ".join(problems))
    return count


def generate(cfg: SynthConfig) -> Path:
    """Write a class-folder tree (single) or images/ + labels.csv (multi); return DATA's path."""
    names = list(SHAPES)[: _class_count(cfg)]
    out, size, per_class = cfg.out, cfg.size, cfg.per_class
    rng = np.random.default_rng(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.task == "single":
        for name in names:
            (out / name).mkdir(exist_ok=True)
            for i in range(per_class):
                render([name], size=size, rng=rng).save(out / name / f"{i:05d}.png")
        logger.info("wrote %d images in %d class folders under %s",
                    per_class * len(names), len(names), out)
        return out
    (out / "images").mkdir(exist_ok=True)
    rows = []
    total = math.ceil(per_class * len(names) / 2)  # ~2 labels per image
    for i in range(total):
        k = int(rng.integers(1, 4))
        chosen = sorted(rng.choice(len(names), size=k, replace=False).tolist())
        labels = [names[j] for j in chosen]
        render(labels, size=size, rng=rng).save(out / "images" / f"{i:05d}.png")
        rows.append((f"images/{i:05d}.png", " ".join(labels)))
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "labels"])
        writer.writerows(rows)
    logger.info("wrote %d multi-label images and %s", total, csv_path)
    return csv_path
