"""The learning-rate schedule: a linear or error-driven warm-up, then cosine, steps or constant.

One object sets every parameter group's LR before each optimizer step from the group's base LR
and a multiplier. Besides the step count it keeps one piece of state, whether the error-driven
warm-up (He et al.'s ResNet-110 start: LR / 10 until the training error falls below 80%) is
still on; `state_dict` holds both, so a resumed run goes on where it stopped.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from training.recipe import Recipe

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step", "constant")
FINAL_COSINE = 0.01  # cosine decays to this share of the base LR
STEP_MILESTONES = (0.5, 0.75)  # step: the LR is divided by 10 at these shares of the steps
ERROR_WARMUP_FACTOR = 0.1  # the error-driven warm-up runs at LR / 10 (the paper's 0.01 of 0.1)
ERROR_WARMUP_MAX_SHARE = 0.1  # ... for at most this share of the steps
ERROR_WINDOW = 20  # optimizer steps whose training error is averaged for that decision


def schedule_multiplier(kind: str, step: int, *, total_steps: int, warmup_steps: int) -> float:
    """The factor on a base LR at `step` (0-based) of `total_steps`, after a linear warm-up."""
    if step < warmup_steps:
        return 0.01 + 0.99 * (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "step":
        return 0.1 ** sum(step >= round(share * total_steps) for share in STEP_MILESTONES)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return FINAL_COSINE + (1 - FINAL_COSINE) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LRSchedule:
    """Sets the LR of each group of `optimizer` per step; backbone groups (`part` "backbone")
    stay at 0 for the first `freeze_steps` (the head-only warm-up)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int,
                 warmup_steps: int = 0, freeze_steps: int = 0,
                 warmup_until_error: float | None = None) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        self.optimizer, self.kind = optimizer, kind
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.freeze_steps = freeze_steps
        self.warmup_until_error = warmup_until_error
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0  # optimizer steps taken (the name torch's schedulers use)
        self.error_warmup = warmup_until_error is not None
        self.error_warmup_ended_at: int | None = None  # the step the warm-up ended at
        self._errors: deque[float] = deque(maxlen=ERROR_WINDOW)
        self._apply()

    def multiplier(self, part: str | None = None) -> float:
        """The factor on a base LR for the next optimizer step."""
        if part == "backbone" and self.last_epoch < self.freeze_steps:
            return 0.0
        if self.error_warmup:
            return ERROR_WARMUP_FACTOR
        return schedule_multiplier(self.kind, self.last_epoch, total_steps=self.total_steps,
                                   warmup_steps=self.warmup_steps)

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self.multiplier(group.get("part"))

    def step(self) -> None:
        """After an optimizer step: move on one step."""
        self.last_epoch += 1
        self._end_error_warmup_if_due()
        self._apply()

    @property
    def wants_error(self) -> bool:
        """Whether `observe_error` is still needed (the error-driven warm-up is on)."""
        return self.error_warmup

    def observe_error(self, error: float) -> None:
        """The training error of the step just taken (share of its images misclassified)."""
        if self.error_warmup:
            self._errors.append(error)

    def _end_error_warmup_if_due(self) -> None:
        if not self.error_warmup or self.warmup_until_error is None:
            return
        cap = max(1, round(ERROR_WARMUP_MAX_SHARE * self.total_steps))
        running = sum(self._errors) / len(self._errors) if self._errors else 1.0
        if len(self._errors) == self._errors.maxlen and running < self.warmup_until_error:
            logger.info("training error %.3f is below %.2f after %d steps: the LR goes up from "
                        "lr/10 to lr", running, self.warmup_until_error, self.last_epoch)
        elif self.last_epoch >= cap:
            logger.warning("training error still %.3f (not below %.2f) after %d steps, 10%% of "
                           "the run: the warm-up at lr/10 ends anyway", running,
                           self.warmup_until_error, self.last_epoch)
        else:
            return
        self.error_warmup = False
        self.error_warmup_ended_at = self.last_epoch
        self._errors.clear()

    def get_last_lr(self) -> list[float]:
        """Each group's current LR."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the step count, whether the error-driven warm-up is on, its window."""
        return {"last_epoch": self.last_epoch, "error_warmup": self.error_warmup,
                "error_warmup_ended_at": self.error_warmup_ended_at,
                "errors": list(self._errors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (a LambdaLR state of older runs gives its step count)."""
        self.last_epoch = int(state["last_epoch"])
        self.error_warmup = bool(state.get("error_warmup", False))
        self.error_warmup_ended_at = state.get("error_warmup_ended_at")
        self._errors = deque((float(e) for e in state.get("errors", [])), maxlen=ERROR_WINDOW)
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, *, steps_per_epoch: int,
                    epochs: int, freeze_epochs: int = 0) -> LRSchedule:
    """The recipe's schedule over `epochs` of `steps_per_epoch` optimizer steps."""
    return LRSchedule(optimizer, kind=recipe.schedule, total_steps=steps_per_epoch * epochs,
                      warmup_steps=max(1, round(recipe.warmup_epochs * steps_per_epoch))
                      if recipe.warmup_epochs > 0 else 0,
                      freeze_steps=freeze_epochs * steps_per_epoch,
                      warmup_until_error=recipe.warmup_until_error)


def optimizer_steps(micro_batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of `micro_batches` loader batches (the last group may be
    short)."""
    return math.ceil(micro_batches / accumulate)
