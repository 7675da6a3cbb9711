"""TrainConfig: the one typed home of a training run's options (CLI -> TrainConfig -> objects)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.architectures import STEMS
from models.preprocessing import DEFAULT_MAX_PIXELS
from training.errors import ConfigError

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 4096
STEM_CHOICES = ("auto", *STEMS)
TASK_CHOICES = (None, "single", "multi", "single_label", "multi_label")


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field (`batch_size` -> `--batch-size`)."""
    return "--" + name.replace("_", "-")


def _number_problem(name: str, value: Any, low: float, high: float, *, integer: bool = False,
                    low_open: bool = False, high_open: bool = False) -> str | None:
    """Why `value` is not a finite number in the range (None when it is)."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low) \
            or (high_open and value == high):
        what = "an integer" if integer else "a finite number"
        low_s, high_s = (f"{int(low)}", f"{int(high)}") if integer else (f"{low:g}", f"{high:g}")
        span = f"{'(' if low_open else '['}{low_s}, {high_s}{')' if high_open else ']'}"
        return f"{flag(name)} must be {what} in {span}, got {value!r}"
    return None


# name -> (low, high, integer, low_open, high_open); optional fields may also be None.
_RANGES: dict[str, tuple[float, float, bool, bool, bool]] = {
    "val_fraction": (0.0, 1.0, False, True, True),
    "image_size": (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, True, False, False),
    "epochs": (1, 100_000, True, False, False),
    "freeze_epochs": (0, 100_000, True, False, False),
    "batch_size": (1, 1_000_000, True, False, False),
    "lr": (0.0, 10.0, False, True, False),
    "backbone_lr_scale": (0.0, 100.0, False, False, False),
    "weight_decay": (0.0, 10.0, False, False, False),
    "warmup_epochs": (0.0, 100_000.0, False, False, False),
    "label_smoothing": (0.0, 1.0, False, False, True),
    "min_scale": (0.0, 1.0, False, True, False),
    "trivial_augment": (0.0, 1.0, False, False, False),
    "eval_resize_ratio": (1.0, 4.0, False, False, False),
    "workers": (0, 1024, True, False, False),
    "patience": (1, 100_000, True, False, False),
    "max_pixels": (1, 2**40, True, False, False),
}
_OPTIONAL = frozenset({"batch_size", "lr", "backbone_lr_scale", "warmup_epochs", "min_scale",
                       "trivial_augment", "eval_resize_ratio", "patience"})


@dataclass
class TrainConfig:
    """Every option of `fit`; None means "let the recipe choose" (see training.recipe)."""

    data: Path
    output: Path
    val: Path | None = None
    task: str | None = None  # "single" | "multi" | None (inferred from the layout)
    val_fraction: float = 0.2
    arch: str = "resnet50"
    weights: str = "imagenet"  # "imagenet" | "none" | path to .pth/.safetensors
    stem: str = "auto"  # "auto" | key of models.architectures.STEMS
    image_size: int = 224
    epochs: int = 10
    freeze_epochs: int = 0
    batch_size: int | None = None
    lr: float | None = None
    backbone_lr_scale: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float | None = None
    label_smoothing: float = 0.1
    min_scale: float | None = None
    trivial_augment: float | None = None  # probability of TrivialAugmentWide per image
    eval_resize_ratio: float | None = None
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    amp: bool = True
    patience: int | None = None
    resume: Path | None = None
    overwrite: bool = False  # replace a checkpoint already in `output`
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoding budget per image (larger JPEGs are reduced)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these options (empty when they are usable)."""
        out = []
        for name, (low, high, integer, low_open, high_open) in _RANGES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            problem = _number_problem(name, value, low, high, integer=integer,
                                      low_open=low_open, high_open=high_open)
            if problem:
                out.append(problem)
        if not out and self.freeze_epochs > self.epochs:
            out.append(f"--freeze-epochs ({self.freeze_epochs}) must not exceed --epochs "
                       f"({self.epochs})")
        if self.stem not in STEM_CHOICES:
            out.append(f"--stem must be one of {', '.join(STEM_CHOICES)}, got {self.stem!r}")
        if self.task not in TASK_CHOICES:
            out.append(f"--task must be single or multi, got {self.task!r}")
        if self.resume is not None and self.overwrite:
            out.append("--resume continues the run in --output and --overwrite replaces it: "
                       "pass one of them")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            out.append(f"--seed must be an integer >= 0, got {self.seed!r}")
        return out

    @property
    def pretrained(self) -> bool:
        """True when training starts from existing weights (fine-tuning)."""
        return self.weights != "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
