"""The weights a run starts from: the --weights check."""

from __future__ import annotations

from pathlib import Path

from models import checkpoint
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
