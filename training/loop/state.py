"""The resume state (`last.pt`): plain tensors and values, loaded with weights_only=True.

A state records what it belongs to: the options that shape the run and a digest of its
train/validation split. Resuming checks both, so a state is never continued under other
options or against other data.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from training.config import TrainConfig
from training.exceptions import ResumeError
from training.options import flag_of, identity_fields
from training.storage import write_atomically

if TYPE_CHECKING:
    from training.context import RunContext
    from training.data.load import TrainingData

logger = logging.getLogger(__name__)

TIE_TOLERANCE = 1e-9  # monitored figures closer than this are equal (float rounding, no gain)


@dataclass
class Progress:
    """What survives an epoch boundary (and a resume)."""

    epoch: int = 0  # epochs done
    best_value: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best one
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, Any] = field(default_factory=dict)

    def record(self, epoch: int, row: dict[str, Any], *, value: float, loss: float,
               metrics: dict[str, Any]) -> bool:
        """Add the history row of the epoch just validated (0-based `epoch`); True when it is
        the best so far (`value` is the monitored figure, `loss` the validation loss)."""
        self.history.append(row)
        self.epoch = epoch + 1
        # Accuracy on a small validation set often ties between epochs: then the epoch with
        # the lower validation loss is the better model.
        improved = value > self.best_value + TIE_TOLERANCE or (
            abs(value - self.best_value) <= TIE_TOLERANCE and loss < self.best_loss)
        if improved:
            self.best_value, self.best_loss, self.best_epoch = value, loss, epoch
            self.bad_epochs = 0
            self.best_metrics = {**metrics, "loss": loss, "epoch": epoch + 1}
        else:
            self.bad_epochs += 1
        return improved

    @property
    def elapsed(self) -> float:
        """Seconds the run had spent when its last epoch ended (0 before the first)."""
        return self.history[-1].get("elapsed", 0) if self.history else 0

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the resume state."""
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Progress:
        """The progress a resume state recorded."""
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


def run_identity(run: RunContext, data: TrainingData) -> dict[str, Any]:
    """What a resume state must match: the options marked `identity=True` on TrainConfig (the
    task as resolved for the data), every value of the resolved recipe, the split, and the
    weights of the checkpoint it started from (where it started from one)."""
    options = {name: _plain(getattr(run.cfg, name)) for name in identity_fields(TrainConfig)}
    options["task"] = data.task
    if run.parent is not None:  # the folder --weights names may hold another model by now
        options["parent_weights_sha256"] = run.parent.weights_sha256
    return {"options": {**options, **run.recipe.to_dict()}, "split": dict(data.split)}


def _plain(value: Any) -> Any:
    """A value as a resume state holds it (a path as its text)."""
    return str(value) if isinstance(value, Path) else value


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the RNG states from `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """The RNG states saved by this rank, or None when the run had another world size."""
    per_rank = state.get("rng")
    if state.get("world_size", 1) != world_size or not isinstance(per_rank, list) \
            or len(per_rank) != world_size:
        return None
    return per_rank[rank]


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the resume state atomically (a failed or killed write leaves the previous one)."""
    write_atomically(path, lambda fh: _torch_save(state, fh))


def _torch_save(state: dict[str, Any], fh: BinaryIO) -> None:
    """torch.save, but a failed write raises its OSError: torch's zip writer hides it behind
    a RuntimeError ("unexpected pos") raised while it closes."""
    try:
        torch.save(state, fh)
    except RuntimeError as exc:
        cause = exc.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from exc


def load_state(path: Path) -> dict[str, Any]:
    """Read a resume state without executing code."""
    if not path.is_file():
        raise ResumeError(f"{path}: no resume state here (it is written after each epoch)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise ResumeError(f"{path}: cannot be read ({exc})") from exc


def check_fits_run(path: Path, state: dict[str, Any], *, arch: str, classes: list[str],
                   identity: dict[str, Any]) -> None:
    """Refuse a state saved for another model, under other options or for another split,
    saying what differs."""
    if state.get("classes") != classes or state.get("arch") != arch:
        raise ResumeError(f"{path}: saved for {state.get('arch')} with classes "
                          f"{state.get('classes')!r:.80}, not this run")
    saved = state.get("identity")
    if not isinstance(saved, dict):
        raise ResumeError(f"{path}: records neither the options nor the split it was saved "
                          "with, so it cannot be checked against this run; start a new run")
    before, now = saved.get("options", {}), identity["options"]
    changed = [f"{flag_of(TrainConfig, k)} {before.get(k)!r} -> {v!r}" for k, v in now.items()
               if before.get(k) != v]
    if changed:
        raise ResumeError(f"{path}: saved with other options than this run's: "
                          f"{', '.join(changed)}; resume with the saved values or start a "
                          "new run")
    old, new = saved.get("split", {}), identity["split"]
    if old.get("sha256") != new["sha256"]:
        raise ResumeError(
            f"{path}: saved for another train/validation split ({old.get('train')} / "
            f"{old.get('val')} images) than this run's ({new['train']} / {new['val']}, "
            f"from {new['source']}); resume with the split it was saved with or start a new run")


def restore_objects(path: Path, state: dict[str, Any], objects: dict[str, Any]) -> None:
    """Load each object's state dict from `state[name]` (model, optimizer, scheduler, ...)."""
    try:
        for name, target in objects.items():
            target.load_state_dict(state[name])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResumeError(f"{path}: does not fit this run ({first})") from exc
