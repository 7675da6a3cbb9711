"""The run context: what every stage of one `fit` reads, built once at its start."""

from __future__ import annotations

from dataclasses import dataclass

from models.device import Accelerator
from training.config import TrainConfig
from training.distributed import DistInfo
from training.parent import Parent
from training.recipe import Recipe


@dataclass(frozen=True)
class RunContext:
    """The options, the recipe resolved from them, this process's place in the run, the
    device it trains on, and the checkpoint it starts from (--weights CHECKPOINT_DIR)."""

    cfg: TrainConfig
    recipe: Recipe
    info: DistInfo
    accelerator: Accelerator
    parent: Parent | None = None

    @property
    def name(self) -> str:
        """The checkpoint's name: the output folder's."""
        return self.cfg.output.resolve().name
