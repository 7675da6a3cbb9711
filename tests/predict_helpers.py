"""A checkpoint with everything the served scores depend on (a calibration temperature and an
unknown-input rule fitted on real features), and folders of varied test images, for the
tests that compare bulk prediction with /predict."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import checkpoint
from models.card import ModelCard, Preprocessing
from models.preprocessing import Normalize, eval_transform
from models.unknown import WithFeatures, class_means, cosine_distance, unknown_record
from tests.serving_helpers import CLASSES, color_image

TEMPERATURE = 1.7


def save_with_rule(directory: Path, model: torch.nn.Module, pre: Preprocessing, *,
                   name: str) -> Path:
    """Save `model` (the session's colour model) as a single-label checkpoint whose card has
    a temperature and an unknown-input rule (class means of its own features)."""
    model = copy.deepcopy(model).eval()
    transform, normalize = eval_transform(pre), Normalize(pre)
    images = [transform(color_image(n, seed=500 + s)) for s in range(6) for n in CLASSES]
    targets = torch.tensor([i for _ in range(6) for i in range(len(CLASSES))])
    with torch.no_grad():
        _, features = WithFeatures(model, "fc")(normalize(torch.stack(images)))
    means = class_means(features, targets, len(CLASSES))
    checkpoint.attach_class_means(model, means)
    scores = cosine_distance(features, means).numpy()
    card = ModelCard(name=name, arch="resnet18", task="single_label", classes=CLASSES,
                     preprocessing=pre, unknown=unknown_record(scores),
                     calibration={"temperature": TEMPERATURE, "ece_before": 0.1,
                                  "ece_after": 0.05, "bins": 15})
    return checkpoint.save(directory, model, card)


def write_images(folder: Path, count: int = 12) -> list[Path]:
    """`count` varied image files under `folder` (JPEG and PNG, sizes and aspect ratios,
    grey and RGBA, in a nested folder too); the paths in name order."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nested").mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(count):
        name = CLASSES[i % len(CLASSES)]
        size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        image = color_image(name, seed=i, size=size)
        if i % 4 == 1:
            image = image.convert("L")
        elif i % 4 == 2:
            image = image.convert("RGBA")
        where = folder / "nested" if i % 3 == 0 else folder
        path = where / f"{i:03d}.{'png' if i % 2 else 'jpg'}"
        if path.suffix == ".jpg" and image.mode == "RGBA":
            image = image.convert("RGB")
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return sorted(paths)


def grey_image(size: tuple[int, int]) -> Image.Image:
    """A flat grey image (unlike every class)."""
    return Image.new("RGB", size, (128, 128, 128))
