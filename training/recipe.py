"""The recipe: defaults resolved from the kind of run (pretrained or not, image size, epochs,
single- or multi-label).

Fine-tuning a pretrained network and training a small network from scratch for a few epochs
want different settings; the user passes neither and gets the right one. Every value can still
be pinned on the command line, and the resolved values are written to the card. The runs that
checked the from-scratch defaults on real images, and the multi-label ones, are in
docs/training-recipe.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from models.architectures import OWN_STEM, arch_spec
from training.data.discovery import infer_task
from training.exceptions import ConfigError

if TYPE_CHECKING:
    from training.config import TrainConfig

# From scratch, crops up to this size halve once before layer1: ImageNet's stem quarters them,
# which leaves small images too little resolution, and stride 1 (--stem small) is far slower.
STRIDE2_STEM_MAX = 96
# Multi-label: any crop may cut an object out of the frame while its label stays on, so the
# whole image is kept; that alone was the gain measured on real multi-label pictures, where
# pos_weight made no difference (docs/training-recipe.md, "Multi-label recipe").
MULTI_LABEL_MIN_SCALE = 1.0
MULTI_LABEL_POS_WEIGHT = "balanced"  # negatives/positives per class, clamped to 1..100

# Named recipes: their values replace the kind-of-run defaults; options given still win.
# he2016-cifar is section 4.2 of He et al., "Deep Residual Learning for Image Recognition":
# SGD (momentum 0.9, weight decay 1e-4), batch 128, LR 0.1 divided by 10 at 32k and 48k of
# 64k iterations (50% and 75% of whatever --epochs makes), 4 px padding, a random crop and a
# flip, the single original view for evaluation, no label smoothing and no other augmentation.
PRESETS: dict[str, dict[str, Any]] = {
    "he2016-cifar": {
        "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128,
        "lr": 0.1, "backbone_lr_scale": 1.0, "schedule": "step", "warmup_epochs": 0.0,
        "label_smoothing": 0.0, "pad_crop": 4, "min_scale": 1.0, "hflip": True,
        "trivial_augment": 0.0, "eval_resize_ratio": 1.0, "normalize": "dataset",
    },
}
# The paper's ResNet-110 starts at LR 0.01 "until the training error is below 80%".
HE2016_DEEP_ARCHS = ("resnet110", "resnet110b")
HE2016_WARMUP_ERROR = 0.8


def preset_values(cfg: TrainConfig) -> dict[str, Any]:
    """The named recipe's values for this run (empty without --recipe)."""
    if cfg.recipe_name is None:
        return {}
    values = dict(PRESETS[cfg.recipe_name])
    if cfg.recipe_name == "he2016-cifar" and cfg.arch in HE2016_DEEP_ARCHS:
        values["warmup_until_error"] = HE2016_WARMUP_ERROR
    return values


def default_hflip(cfg: TrainConfig, multi: bool) -> bool:
    """Flips on, except for multi-label runs from scratch: there a mirrored object keeps its
    label only when its class looks the same in a mirror, and a short run without a
    pretrained prior learnt 5 points of mAP more without them (docs/training-recipe.md)."""
    return not (multi and not cfg.pretrained)


def default_schedule(cfg: TrainConfig, multi: bool) -> str:
    """Cosine, except for multi-label runs from scratch: there a short run is still learning
    steeply at its end, and a cosine decay slowed it by 12 points of held-out mAP against a
    constant LR (docs/training-recipe.md, "Multi-label recipe")."""
    return "constant" if multi and not cfg.pretrained else "cosine"


def default_warmup_epochs(cfg: TrainConfig, multi: bool) -> float:
    """min(1, 0.1 x epochs), except for multi-label runs from scratch (none, as measured)."""
    return 0.0 if multi and not cfg.pretrained else min(1.0, 0.1 * cfg.epochs)


@dataclass(frozen=True)
class Recipe:
    """Concrete hyper-parameters for one run."""

    stem: str
    batch_size: int
    lr: float
    backbone_lr_scale: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    min_scale: float
    hflip: bool
    pos_weight: str | None  # multi-label only: None for single-label runs
    trivial_augment: float
    eval_resize_ratio: float
    optimizer: str = "adamw"
    momentum: float | None = None  # sgd only
    schedule: str = "cosine"
    warmup_until_error: float | None = None
    pad_crop: int = 0
    normalize: str = "imagenet"
    accumulate: int = 1
    name: str | None = None  # the named recipe these values started from, if any

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step and process."""
        return self.batch_size * self.accumulate

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the card."""
        return asdict(self)


def default_stem(cfg: TrainConfig) -> str:
    """A stem that keeps small images from being downsampled to nothing (from scratch only);
    an architecture with its own stem (the CIFAR ResNets) keeps it."""
    if arch_spec(cfg.arch).own_stem:
        return OWN_STEM
    if cfg.pretrained or cfg.image_size > STRIDE2_STEM_MAX:
        return "imagenet"
    return "small_stride2"


def default_min_scale(cfg: TrainConfig) -> float:
    """RandomResizedCrop's smallest area: aggressive for large pretrained crops, mild when small.

    A 32 px image cropped to 8% keeps ~9x9 pixels of the object, which teaches nothing in a
    short run; so the floor rises as the crop shrinks and as the run gets shorter.
    """
    if cfg.pretrained and cfg.image_size >= 128:
        return 0.08
    size_term = min(1.0, max(0.0, math.log2(224 / cfg.image_size) / math.log2(224 / 32)))
    base = 0.08 + 0.27 * size_term  # 224 px -> 0.08, 32 px -> 0.35
    if not cfg.pretrained:
        base += 0.15  # from scratch there is no prior to fall back on: keep objects whole
    short_run = min(1.0, max(0.0, (30 - cfg.epochs) / 25)) * 0.3  # up to +0.3 below 5 epochs
    return round(min(0.8, base + short_run), 3)


def default_trivial_augment(cfg: TrainConfig) -> float:
    """Share of images given TrivialAugmentWide: all when fine-tuning, few in short scratch runs.

    Strong augmentation slows learning more than a short run from scratch can make up for, so
    it stays off up to 10 epochs and ramps in up to 40.
    """
    if cfg.pretrained:
        return 1.0
    return round(min(1.0, max(0.0, (cfg.epochs - 10) / 30)), 3)


def set_or_default(value: Any, default: Any) -> Any:
    """The option's value where the user set it, else the recipe's default (None: unset)."""
    return default if value is None else value


def resolve(cfg: TrainConfig) -> Recipe:
    """Fill every unset option of `cfg`: the named recipe's value where it has one, else the
    default for this kind of run (the task is --task, else inferred from DATA's layout)."""
    multi = infer_task(cfg.data, cfg.task) == "multi_label"
    preset = preset_values(cfg)

    def pick(name: str, default: Any) -> Any:
        """The option as given, else the named recipe's value, else `default`."""
        return set_or_default(getattr(cfg, name), preset.get(name, default))

    stem = default_stem(cfg) if cfg.stem == "auto" else cfg.stem
    optimizer = pick("optimizer", "adamw")
    warmup_until_error = pick("warmup_until_error", None)
    if multi and warmup_until_error is not None:
        raise ConfigError("--warmup-until-error needs a training error: single-label data "
                          "only, and this data is multi-label")
    return Recipe(
        stem=stem,
        batch_size=pick("batch_size", 64 if cfg.pretrained else 32),
        lr=pick("lr", 1e-3 if cfg.pretrained else 2e-3),
        backbone_lr_scale=pick("backbone_lr_scale", 0.1 if cfg.pretrained else 1.0),
        weight_decay=pick("weight_decay", 0.05),
        warmup_epochs=pick("warmup_epochs", default_warmup_epochs(cfg, multi)),
        label_smoothing=pick("label_smoothing", 0.1),
        min_scale=1.0 if pick("pad_crop", 0) else pick(
            "min_scale", MULTI_LABEL_MIN_SCALE if multi else default_min_scale(cfg)),
        hflip=pick("hflip", default_hflip(cfg, multi)),
        pos_weight=pick("pos_weight", MULTI_LABEL_POS_WEIGHT) if multi else None,
        trivial_augment=pick("trivial_augment", default_trivial_augment(cfg)),
        eval_resize_ratio=pick("eval_resize_ratio",
                               arch_spec(cfg.arch).pretrained_resize_ratio(cfg.weights)
                               if cfg.pretrained else 1.0),
        optimizer=optimizer,
        momentum=pick("momentum", 0.9) if optimizer == "sgd" else None,
        schedule=pick("schedule", default_schedule(cfg, multi)),
        warmup_until_error=warmup_until_error,
        pad_crop=pick("pad_crop", 0),
        normalize=pick("normalize", "imagenet"),
        accumulate=cfg.accumulate,
        name=cfg.recipe_name,
    )
