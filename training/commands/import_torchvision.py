"""`import-torchvision`: torchvision's ImageNet classifier written as a checkpoint."""

from __future__ import annotations

from pathlib import Path

from models.architectures import build, imagenet_categories, imagenet_weights
from models.card import ModelCard, weights_preprocessing
from training.config import ImportConfig
from training.export.checkpoint import write_checkpoint


def import_torchvision(cfg: ImportConfig) -> Path:
    """Write torchvision's ImageNet classifier for cfg.arch into cfg.output (1000 classes)."""
    weights = imagenet_weights(cfg.arch)
    model = build(cfg.arch, num_classes=1000, weights="imagenet")
    card = ModelCard(
        name=cfg.output.name, arch=cfg.arch, task="single_label",
        classes=imagenet_categories(cfg.arch), preprocessing=weights_preprocessing(cfg.arch),
        stem="imagenet", metrics=dict(weights.meta.get("_metrics", {}).get("ImageNet-1K", {})),
        training={"source": f"torchvision {weights}", "recipe": weights.meta.get("recipe")})
    return write_checkpoint(cfg.output, model, card)
