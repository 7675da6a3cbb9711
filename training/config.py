"""TrainConfig: the one typed home of a training run's options (CLI -> TrainConfig -> objects)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


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
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pretrained(self) -> bool:
        """True when training starts from existing weights (fine-tuning)."""
        return self.weights != "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
