"""A tiny real digits model with its card's drift reference, and real pictures of another
kind: scikit-learn's handwritten digit scans and scikit-image's texture photographs.

The model is a CIFAR ResNet-20 at 16 px trained in memory for a few seconds (about 95%
accurate on held-out digits), temperature-calibrated and given the unknown-input rule on its
validation images, then given its drift reference by the same function `fit` uses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models import checkpoint
from models.architectures import arch_spec, build
from models.calibration import ECE_BINS, expected_calibration_error, fit_temperature
from models.card import ModelCard, Preprocessing
from models.device import Accelerator
from models.outputs import probabilities
from models.preprocessing import Normalize, eval_transform
from models.unknown import WithFeatures, class_means, cosine_distance, unknown_record

ARCH = "resnet20"
SIZE = 16
SPLITS = (("train", 700), ("val", 300), ("holdout", 300))  # of the 1797 scans, seeded
TEXTURES = ("brick", "grass", "gravel")


def write_digits(root: Path, seed: int = 0) -> dict[str, Path]:
    """The digit scans as 8x8 grey PNGs in class folders: train/, val/ and holdout/."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    start, folders = 0, {}
    for split, count in SPLITS:
        chosen = order[start:start + count]
        start += len(chosen)
        folders[split] = root / split
        for i in chosen.tolist():
            path = root / split / str(digits.target[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            scan = (digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
            Image.fromarray(scan).save(path)
    return folders


def write_textures(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` grey crops (48-96 px) of scikit-image's texture photographs, as PNGs."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pictures = [getattr(skimage.data, name)() for name in TEXTURES]
    paths = []
    for k in range(count):
        picture = pictures[k % len(pictures)]
        side = int(rng.integers(48, 97))
        y, x = (int(rng.integers(0, n - side)) for n in picture.shape[:2])
        paths.append(folder / f"texture{k:04d}.png")
        Image.fromarray(picture[y:y + side, x:x + side]).save(paths[-1])
    return paths


def _crops(folder: Path, classes: list[str] | None = None):
    """The folder's images through the eval transform (as fit decodes them), and labels."""
    from training.data.datasets import ImageDataset
    from training.data.discovery import discover

    found = discover(folder, task="single_label", classes=classes)
    pre = Preprocessing.for_crop(SIZE, ratio=arch_spec(ARCH).eval_resize_ratio)
    dataset = ImageDataset(found.samples, found.classes, "single_label", eval_transform(pre))
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([image for image, _, _ in items])
    return dataset, images, torch.stack([target for _, target, _ in items]), pre


def train_digits_checkpoint(folders: dict[str, Path], directory: Path, *,
                            steps: int = 80) -> Path:
    """Train, calibrate, fit the unknown rule, save, and add the drift reference."""
    from training.export.drift import drift_reference

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread beats contended ones
    try:
        train, train_x, train_y, pre = _crops(folders["train"])
        val, val_x, val_y, _ = _crops(folders["val"], train.classes)
        normalize = Normalize(pre)
        torch.manual_seed(0)
        model = build(ARCH, num_classes=len(train.classes))
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        inputs = normalize(train_x)
        model.train()
        for step in range(steps):
            batch = torch.randint(0, len(train_y), (32,),
                                  generator=torch.Generator().manual_seed(step))
            loss = F.cross_entropy(model(inputs[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        split = WithFeatures(model, arch_spec(ARCH).classifier)
        with torch.no_grad():
            _, train_features = split(inputs)
            val_logits, val_features = split(normalize(val_x))
        temperature = fit_temperature(val_logits, val_y, "single_label")
        ece = [expected_calibration_error(probabilities(val_logits, "single_label", t).numpy(),
                                          val_y.numpy(), "single_label") for t in (None,
                                                                                   temperature)]
        means = class_means(train_features, train_y, len(train.classes))
        checkpoint.attach_class_means(model, means)
        card = ModelCard(
            name=directory.name, arch=ARCH, task="single_label", classes=train.classes,
            preprocessing=pre, unknown=unknown_record(cosine_distance(val_features,
                                                                      means).numpy()),
            calibration={"temperature": temperature, "ece_before": ece[0],
                         "ece_after": ece[1], "bins": ECE_BINS})
        checkpoint.save(directory, model, card)
        served, _ = checkpoint.load(directory)  # scored as the server loads it, as fit does
        drift = drift_reference(served, card, val, accelerator=Accelerator.create("cpu", "fp32"),
                                batch_size=100, workers=0)
        checkpoint.save(directory, model, dataclasses.replace(card, drift=drift))
    finally:
        torch.set_num_threads(threads)
    return directory
