"""The checkpoint files: `model.safetensors` + `card.json` (+ reports), written and read only
here; what the card may hold is models.card.

A checkpoint is plain values: weights in safetensors (loading never executes code) and a JSON
card that says what the model is, which classes it predicts, and exactly how to preprocess.
A card with an unknown-input rule has the rule's tensors in the weights file too (named
`unknown.*`, models.unknown), validated at load and carried on the model (STATE_ATTR).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as serialize_weights
from torch import nn

from models.architectures import arch_spec, build, unwrap
from models.atomic import write_unit
from models.card import ModelCard
from models.unknown import (
    CLASS_MEANS_KEY,
    STATE_PREFIX,
    attach_state,
    state_problem,
    unknown_state,
)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
# The report files training writes beside the weights and the card.
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"  # single-label checkpoints
PR_CURVES_FILE = "pr_curves.png"  # multi-label checkpoints
CALIBRATION_FILE = "calibration.png"  # reliability diagrams before/after temperature scaling
REPORT_FILES = (METRICS_FILE, HISTORY_FILE, CURVES_FILE, CONFUSION_MATRIX_FILE, PR_CURVES_FILE,
                CALIBRATION_FILE)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
WEIGHTS_DIGEST_FIELD = "weights_sha256"  # in card.json: the sha256 of model.safetensors
MAX_CARD_BYTES = 4 * 1024 * 1024  # a card past this is refused unread
MAX_MESSAGE_CHARS = 1000  # longest error message a checkpoint can produce


class CheckpointError(ValueError):
    """A checkpoint file is missing or invalid; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = printable(str(path))
        self.problem = printable(problem)
        super().__init__(f"{self.path}: {self.problem}")


def printable(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` on one line, control and other unprintable characters escaped, at most
    `limit` characters: safe to log and to show, whatever a checkpoint file held."""
    safe = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else safe[:limit - 3] + "..."


def save(directory: str | Path, model: nn.Module, card: ModelCard, *,
         reports: Mapping[str, Callable[[Path], None]] | None = None,
         replaces: Collection[str] = ()) -> Path:
    """Write `model.safetensors`, `card.json` and `reports` into `directory` as one unit.

    The unit is staged beside `directory` and swapped into place (models.atomic), so a reader
    sees the old checkpoint or the new one, never new weights with an old card; other files in
    the folder stay, except those named in `replaces`. `reports` maps a file name to a function
    that writes it. The card names the weights' sha256, which `load` checks.
    Non-finite weights and values JSON cannot hold are refused before anything is written.
    """
    directory = Path(directory)
    weights = serialize_weights(_state_to_save(model, card, directory),
                                metadata={"format": "pt", "arch": card.arch})
    digest = hashlib.sha256(weights).hexdigest()
    try:
        text = json.dumps(replace(card, weights_sha256=digest).to_dict(), indent=2,
                          allow_nan=False)
    except ValueError as exc:
        raise CheckpointError(directory / CARD_FILE, f"cannot be written as JSON: {exc}") from exc
    try:
        write_unit(directory, {WEIGHTS_FILE: weights, CARD_FILE: (text + "\n").encode()},
                   reports or {}, replaces=replaces)
    except NotADirectoryError as exc:
        raise CheckpointError(directory, "exists and is not a folder") from exc
    logger.info("saved checkpoint %s (%s, %d classes)", directory, card.arch, card.num_classes)
    return directory


def _state_to_save(model: nn.Module, card: ModelCard, directory: Path
                   ) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, checked against the card and for NaN / infinity."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    rule_state = unknown_state(model)
    if (not rule_state) != (card.unknown is None):
        raise ValueError("a card with an unknown-input rule needs the model's unknown-input "
                         "state (its class means ...), and that state needs the rule in the card")
    state.update({k: v.detach().to("cpu", torch.float32).contiguous()
                  for k, v in rule_state.items()})
    outputs = arch_spec(card.arch).head(model).out_features
    if outputs != card.num_classes:
        raise ValueError(f"model has {outputs} outputs but the card lists "
                         f"{card.num_classes} classes")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(directory / WEIGHTS_FILE, (
            f"not written: {len(bad)} tensors hold NaN or infinite values (first: {bad[:3]})"))
    return state


def verify_weights(directory: str | Path) -> None:
    """Check `model.safetensors` against the sha256 its card names (a card naming none, as
    older ones do, passes); a CheckpointError says the two files come from different saves."""
    directory = Path(directory)
    _check_weights_digest(read_card(directory), directory / WEIGHTS_FILE)


def _check_weights_digest(card: ModelCard, path: Path) -> None:
    if card.weights_sha256 is None:
        return
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:  # streamed: a model's weights are not held twice
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if digest.hexdigest() != card.weights_sha256:
        raise CheckpointError(path, (
            f"does not match {CARD_FILE} (sha256 {digest.hexdigest()[:12]}..., the card names "
            f"{card.weights_sha256[:12]}...): the two files come from different saves"))


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_card(directory: str | Path) -> ModelCard:
    """Read and validate `card.json`; whatever the file holds, the only error raised is a
    CheckpointError naming the file and the problem."""
    path = Path(directory) / CARD_FILE
    raw = _read_bounded(path, MAX_CARD_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(path, f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
                              ) from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise CheckpointError(path, "nests arrays or objects too deeply to be read") from exc
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise CheckpointError(path, f"holds a value that cannot be read ({exc})") from exc
    try:
        return ModelCard.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"invalid card: {exc}") from exc


def _read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path`, refused past `limit` bytes (CheckpointError)."""
    try:  # non-blocking, so a FIFO planted as the file cannot hang the reader
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(path, "file is missing") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be opened ({exc.strerror or exc})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(path, "is not a regular file")
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CheckpointError(path, f"is larger than {limit} bytes")
    return data


def open_report(directory: str | Path, filename: str) -> BinaryIO | None:
    """The report `filename` of a checkpoint folder opened for reading, or None unless it is
    a regular file right in that folder: a symlink (wherever it points), a FIFO or a folder
    of that name is never opened, so a folder from a less trusted producer cannot make the
    server read a file outside it."""
    if filename in ("", ".", "..") or "/" in filename or os.sep in filename:
        return None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(Path(directory) / filename, flags)
    except OSError:  # missing, a symlink (ELOOP), not readable
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return open(fd, "rb")


def report_files(directory: str | Path, names: Iterable[str]) -> list[str]:
    """Those of `names` that are regular files right in `directory` (symlinks are not)."""
    found = []
    for name in names:
        try:
            if stat.S_ISREG(os.lstat(Path(directory) / name).st_mode):
                found.append(name)
        except OSError:
            continue
    return found


def load(directory: str | Path, *, map_location: str | torch.device = "cpu"
         ) -> tuple[nn.Module, ModelCard]:
    """Load and validate a checkpoint; the model is returned in eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(directory, "is not a directory")
    card = read_card(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        try:
            pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        except OSError:
            pickles = []
        hint = (f"; found {pickles}, but pickle files are never loaded (they can run code): "
                "export to safetensors") if pickles else ""
        raise CheckpointError(weights_path, f"file is missing{hint}")
    before = _file_identity(weights_path)
    _check_weights_digest(card, weights_path)
    try:
        state = load_file(str(weights_path), device=str(map_location))  # mapped, not copied
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(weights_path, f"cannot be read ({exc})") from exc
    if _file_identity(weights_path) != before:  # hashed one file and parsed another
        raise CheckpointError(weights_path, "was replaced while it was being loaded; retry")
    model = build(card.arch, num_classes=card.num_classes, weights=None, stem=card.stem)
    _attach_unknown_state(model, card, state, weights_path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
             for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(weights_path, (
            f"does not match {card.arch} with {card.num_classes} classes: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"))
    problem = _tensor_values_problem(state, own)
    if problem:
        raise CheckpointError(weights_path, problem)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, card


def attach_class_means(model: nn.Module, means: torch.Tensor) -> None:
    """Give `model` the class means of a cosine unknown-input rule (saved with its weights)."""
    attach_state(model, {CLASS_MEANS_KEY: means})


def _attach_unknown_state(model: nn.Module, card: ModelCard, state: dict[str, torch.Tensor],
                          path: Path) -> None:
    """Move the rule's tensors out of `state` onto `model`; refuse them missing or malformed
    for the card's method."""
    rule = {k: state.pop(k) for k in [k for k in state if k.startswith(STATE_PREFIX)]}
    if card.unknown is None:
        return  # an old card's weights, or tensors the card does not use: not served
    problem = state_problem(card.unknown["method"], rule, model, classes=card.num_classes,
                            head_name=arch_spec(card.arch).classifier)
    if problem:
        raise CheckpointError(path, problem)
    attach_state(model, rule)


def _tensor_values_problem(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
                           ) -> str | None:
    """Why the weights' dtypes or values cannot be served (None when they can): a floating
    tensor stored as another kind, or any NaN or infinity."""
    kinds = [f"{k} ({state[k].dtype})" for k, v in own.items()
             if v.is_floating_point() and not state[k].is_floating_point()]
    if kinds:
        return f"holds tensors that must be floating point: {kinds[:3]}"
    non_finite = [k for k, t in state.items()
                  if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if non_finite:
        return (f"holds NaN or infinite values in {len(non_finite)} tensors "
                f"(first: {non_finite[:3]}); the model would answer NaN")
    return None


def find_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`: every direct, non-hidden subfolder holding a card.json
    or weights (or one that cannot be looked into, so that loading it says why).

    A root that is itself a checkpoint counts as one. Folder names are not checked here: the
    caller decides which names it accepts.
    """
    root = Path(root)
    if (root / CARD_FILE).is_file():
        return [root]
    if not root.is_dir():
        return []
    try:
        children = list(root.iterdir())
    except OSError as exc:
        raise CheckpointError(root, f"cannot be listed ({exc.strerror or exc})") from exc
    return sorted(p for p in children if not p.name.startswith(".") and _holds_checkpoint(p))


def _holds_checkpoint(folder: Path) -> bool:
    try:
        # lexists: a card that is a broken or looping symlink is listed, and its load says why
        return folder.is_dir() and (os.path.lexists(folder / CARD_FILE)
                                    or os.path.lexists(folder / WEIGHTS_FILE))
    except OSError:  # e.g. not searchable: listed, and loading it reports the error
        return True

