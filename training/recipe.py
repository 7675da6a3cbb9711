"""The recipe: defaults resolved from the kind of run (pretrained or not, image size, epochs,
single- or multi-label).

Fine-tuning a pretrained network and training a small network from scratch for a few epochs
want different settings; the user passes neither and gets the right one. Every value can still
be pinned on the command line, and the resolved values are written to the card. Each option's
default is one entry of RECIPE_DEFAULTS, which `resolve` reads and --help describes
(training.config); a named recipe (PRESETS) replaces them where it has a value. The runs that
checked the from-scratch defaults on real images, and the multi-label ones, are in
docs/training-recipe.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from models.architectures import OWN_STEM, arch_spec
from training.data.discovery import infer_task
from training.exceptions import ConfigError
from training.parent import parent_augmentation, read_parent_card

if TYPE_CHECKING:
    from training.config import TrainConfig

# From scratch, crops up to this size halve once before layer1: ImageNet's stem quarters them,
# which leaves small images too little resolution, and stride 1 (--stem small) is far slower.
STRIDE2_STEM_MAX = 96
# From one of our checkpoints (--weights CHECKPOINT_DIR) its mean and std are kept: the
# recipe's `normalize` says so instead of naming a choice of --normalize (training.parent).
PARENT_NORMALIZE = "parent"
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

@dataclass(frozen=True)
class Formula:
    """A default computed from the options, and the words --help gives it."""

    compute: Callable[[TrainConfig], Any]
    shown: str


_SAME = object()  # a Default's value for this kind of run is the one before it


@dataclass(frozen=True)
class Default:
    """How the recipe fills one unset option: its value fine-tuning, from scratch (where it
    differs), and where multi-label runs (all of them, or those from scratch) differ."""

    fine_tuning: Any
    scratch: Any = _SAME
    multi_label: Any = _SAME
    multi_label_scratch: Any = _SAME

    def value(self, cfg: TrainConfig, *, multi: bool) -> Any:
        """The default for this run."""
        chosen = self.fine_tuning
        if not cfg.pretrained and self.scratch is not _SAME:
            chosen = self.scratch
        if multi and self.multi_label is not _SAME:
            chosen = self.multi_label
        if multi and not cfg.pretrained and self.multi_label_scratch is not _SAME:
            chosen = self.multi_label_scratch
        return chosen.compute(cfg) if isinstance(chosen, Formula) else chosen

    def describe(self) -> str:
        """The rule in words, for --help."""
        text = _shown(self.fine_tuning)
        if self.scratch is not _SAME:
            text = f"fine-tuning {text}, from scratch {_shown(self.scratch)}"
        if self.multi_label is not _SAME:
            text += f"; multi-label: {_shown(self.multi_label)}"
        if self.multi_label_scratch is not _SAME:
            text += f"; multi-label from scratch: {_shown(self.multi_label_scratch)}"
        return text


def _shown(value: Any) -> str:
    if isinstance(value, Formula):
        return value.shown
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "off"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def scratch_trivial_augment(cfg: TrainConfig) -> float:
    """Share of images given TrivialAugmentWide from scratch: strong augmentation slows
    learning more than a short run can make up for, so it stays off up to 10 epochs and ramps
    in up to 40."""
    return round(min(1.0, max(0.0, (cfg.epochs - 10) / 30)), 3)


def pretrained_resize_ratio(cfg: TrainConfig) -> float:
    """Eval resize / crop as the pretrained weights were evaluated."""
    return arch_spec(cfg.arch).pretrained_resize_ratio(cfg.weights)


# Each option the recipe fills when it is left unset: its default by kind of run. Multi-label
# runs from scratch keep flips off (a mirrored object keeps its label only when its class
# looks the same in a mirror: 5 points of mAP), hold the LR constant without a warm-up (a short
# run is still learning steeply at its end: 12 points against a cosine decay) and keep the
# whole image (a crop may cut out an object whose label stays on); docs/training-recipe.md.
RECIPE_DEFAULTS: dict[str, Default] = {
    "batch_size": Default(64, scratch=32),
    "lr": Default(1e-3, scratch=2e-3),
    "backbone_lr_scale": Default(0.1, scratch=1.0),
    "optimizer": Default("adamw"),
    "momentum": Default(0.9),
    "weight_decay": Default(0.05),
    "schedule": Default("cosine", multi_label_scratch="constant"),
    "warmup_epochs": Default(Formula(lambda cfg: min(1.0, 0.1 * cfg.epochs),
                                     "min(1, 0.1 x epochs)"), multi_label_scratch=0.0),
    "warmup_until_error": Default(None),
    "label_smoothing": Default(0.1),
    "pad_crop": Default(0),
    "normalize": Default("imagenet"),
    "min_scale": Default(Formula(default_min_scale,
                                 "auto, larger for smaller crops and shorter runs"),
                         multi_label=MULTI_LABEL_MIN_SCALE),
    "hflip": Default(True, multi_label_scratch=False),
    "pos_weight": Default(MULTI_LABEL_POS_WEIGHT),
    "trivial_augment": Default(1.0, scratch=Formula(scratch_trivial_augment,
                                                    "(epochs - 10) / 30 within 0..1")),
    "eval_resize_ratio": Default(Formula(pretrained_resize_ratio, "the weights' own"),
                                 scratch=1.0),
}


def resolve(cfg: TrainConfig) -> Recipe:
    """Fill every unset option of `cfg`: the named recipe's value where it has one, else its
    RECIPE_DEFAULTS entry for this kind of run (the task is --task, else inferred from DATA's
    layout). From one of our checkpoints, its stem, resize/crop ratio, normalisation and
    augmentation (training.parent)."""
    multi = infer_task(cfg.data, cfg.task) == "multi_label"
    preset = preset_values(cfg)
    parent = read_parent_card(cfg.weights)
    if parent is not None:
        pre = parent.preprocessing
        preset = {**preset, **parent_augmentation(parent),
                  "eval_resize_ratio": pre.resize / pre.crop, "normalize": PARENT_NORMALIZE}
    values = {}
    for name, default in RECIPE_DEFAULTS.items():
        given = getattr(cfg, name)
        values[name] = (given if given is not None else preset[name] if name in preset
                        else default.value(cfg, multi=multi))
    if values["pad_crop"]:
        values["min_scale"] = 1.0  # the pad-and-crop replaces the random resized crop
    if not multi:
        values["pos_weight"] = None  # a multi-label loss's weight
    if values["optimizer"] != "sgd":
        values["momentum"] = None
    if multi and values["warmup_until_error"] is not None:
        raise ConfigError("--warmup-until-error needs a training error: single-label data "
                          "only, and this data is multi-label")
    stem = (parent.stem if parent is not None else
            default_stem(cfg) if cfg.stem == "auto" else cfg.stem)
    return Recipe(stem=stem, accumulate=cfg.accumulate, name=cfg.recipe_name, **values)
