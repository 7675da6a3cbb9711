"""The weights a run starts from: the --weights check, and what ImageNet weights expect."""

from __future__ import annotations

from pathlib import Path

from models import checkpoint
from models.architectures import imagenet_weights
from models.checkpoint import Preprocessing
from training.config import TrainConfig
from training.exceptions import ConfigError


def check_weights_option(cfg: TrainConfig) -> None:
    """A --weights path must name a file (a folder gets a hint at the file inside)."""
    if cfg.weights in ("imagenet", "none"):
        return
    path = Path(cfg.weights)
    if path.is_dir():
        inside = path / checkpoint.WEIGHTS_FILE
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise ConfigError(f"--weights {path} is a folder, not a .pth/.safetensors file{hint}")


def weights_preprocessing(arch: str) -> Preprocessing:
    """The eval preprocessing torchvision publishes with `arch`'s ImageNet weights."""
    transforms = imagenet_weights(arch).transforms()
    return Preprocessing(resize=int(transforms.resize_size[0]), crop=int(transforms.crop_size[0]),
                         mean=tuple(transforms.mean), std=tuple(transforms.std),
                         interpolation=transforms.interpolation.value)


def weights_eval_ratio(cfg: TrainConfig) -> float:
    """The eval resize / crop ratio of the run's starting weights (the recipe's default)."""
    ratio = 256 / 224
    if cfg.weights == "imagenet":
        wp = weights_preprocessing(cfg.arch)
        ratio = wp.resize / wp.crop
    return ratio
