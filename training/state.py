"""The resume-state file (`last.pt`): plain tensors and values, loaded with weights_only=True.

A state records what it belongs to: the options that shape the run and a digest of its
train/validation split. Resuming checks both, so a state is never continued under other
options or against other data.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from training.config import flag
from training.errors import ResumeError
from training.storage import write_atomically

logger = logging.getLogger(__name__)

RESUME_FILE = "last.pt"


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


def check_identity(path: Path, state: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse a state saved under other options or for another split, saying what differs."""
    saved = state.get("identity")
    if not isinstance(saved, dict):
        raise ResumeError(f"{path}: records neither the options nor the split it was saved "
                          "with, so it cannot be checked against this run; start a new run")
    before, now = saved.get("options", {}), identity["options"]
    changed = [f"{flag(k)} {before.get(k)!r} -> {v!r}" for k, v in now.items()
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
