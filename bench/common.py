"""Shared benchmark helpers: web-size JPEG photos, a benchmark model, environment facts."""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sized
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image

from app.process.allocator import loaded_allocator
from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.checkpoint import save

WEB_SIZES = [(500, 375), (640, 480), (800, 600), (1024, 768)]
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "retina.jpg", "hubble_deep_field.jpg"]
# torchvision's ImageNet eval presets for the weights we fine-tune from
IMAGENET_PRE = {
    "resnet34": Preprocessing(resize=256, crop=224),
    "resnet50": Preprocessing(resize=232, crop=224),
}


def photo_sources() -> list[Image.Image]:
    """Real photographs shipped with scikit-image (a bench-only dependency)."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    return [Image.open(root / name).convert("RGB") for name in PHOTOS if (root / name).exists()]


def web_jpegs(count: int = 28, quality: int = 90) -> list[bytes]:
    """`count` real photos re-encoded as JPEGs of web size (500x375 .. 1024x768)."""
    sources = photo_sources()
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        w, h = WEB_SIZES[i % len(WEB_SIZES)]
        scale = max(w / src.width, h / src.height)
        img = src.resize((max(w, round(src.width * scale)), max(h, round(src.height * scale))),
                         Image.Resampling.BICUBIC)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        buf = io.BytesIO()
        img.crop((left, top, left + w, top + h)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def benchmark_checkpoint(arch: str, root: Path | None = None) -> Path:
    """A 1000-class checkpoint with random weights and the ImageNet eval preprocessing."""
    root = Path(root or tempfile.mkdtemp(prefix="bench-ckpt-"))
    directory = root / f"bench-{arch}"
    if not (directory / "card.json").exists():
        torch.manual_seed(0)
        model = build(arch, num_classes=1000, weights=None)
        card = ModelCard(name=f"bench-{arch}", arch=arch, task="single_label",
                         classes=[f"class_{i}" for i in range(1000)],
                         preprocessing=IMAGENET_PRE.get(arch, Preprocessing()))
        save(directory, model, card)
    return directory


def images_per_s(fn: Callable[[Any], object], batch: Sized, seconds: float) -> float:
    """Images/s of `fn(batch)`: one warm-up call, then calls for at least `seconds` (and 2)."""
    fn(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 2 * len(batch):
        fn(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def environment() -> dict[str, object]:
    """Device, versions, threads and date for the results table."""
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"{platform.processor() or platform.machine()} cpu, {os.cpu_count()} cores")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "allocator": loaded_allocator(),
    }


def emit(result: object) -> None:
    """Write a result as indented JSON on stdout (logs go to stderr)."""
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
