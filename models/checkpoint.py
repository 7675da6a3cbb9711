"""The checkpoint contract: `model.safetensors` + `card.json`, written and read only here.

A checkpoint is plain values: weights in safetensors (loading never executes code) and a JSON
card that says what the model is, which classes it predicts, and exactly how to preprocess.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import stat
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_weights
from safetensors.torch import save as serialize_weights
from torch import nn

from models.architectures import ARCHITECTURES, STEMS, build
from models.atomic import write_unit

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
TASKS = ("single_label", "multi_label")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
WEIGHTS_DIGEST_FIELD = "weights_sha256"  # in card.json: the sha256 of model.safetensors
MAX_CARD_BYTES = 4 * 1024 * 1024  # a card past this is refused unread
MAX_CARD_DEPTH = 32  # nesting of objects and arrays in a card (real cards use about 5)
MAX_SIDE = 4096  # largest resize or crop, in pixels
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


def _shown(value: object, limit: int = 60) -> str:
    """A short, escaped rendering of a value from a card, for an error message."""
    try:
        text = ascii(value)
    except ValueError:  # an integer with more digits than Python will print
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _numbers_problem(what: str, value: object, *, count: int, low: float, high: float,
                     low_inclusive: bool = True) -> str | None:
    """Why `value` is not a list of `count` finite numbers in the range (None when it is)."""
    want = f"{count} finite numbers in {'[' if low_inclusive else '('}{low}, {high}]"
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return f"{what} must be {want}, got {_shown(value)}"
    for item in value:
        if not _is_finite_number(item) or not low <= item <= high or \
                (not low_inclusive and item == low):
            return f"{what} must be {want}, got {_shown(item)} in {_shown(value)}"
    return None


def _classes_problem(classes: object) -> str | None:
    """Why `classes` is not a non-empty list of unique non-empty strings (None when it is)."""
    if not isinstance(classes, (list, tuple)) or not classes:
        return f"classes must be a non-empty list of class names, got {_shown(classes)}"
    bad = [c for c in classes if not isinstance(c, str) or not c]
    if bad:
        return f"classes must be non-empty strings, got {_shown(bad[0])} in {_shown(classes)}"
    if len(set(classes)) != len(classes):
        return "classes must be unique"
    return None


def _nesting_depth_exceeds(value: object, limit: int) -> bool:
    """True when objects and arrays in `value` nest deeper than `limit` (checked without
    recursion, so any depth is safe to check)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item \
            if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


@dataclass(frozen=True)
class Preprocessing:
    """The exact eval preprocessing: resize shorter side, center crop, normalize."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when valid); pixels scale to [0, 1]."""
        out = [f"preprocessing.{side} must be an integer in [1, {MAX_SIDE}], got {_shown(v)}"
               for side, v in (("resize", self.resize), ("crop", self.crop))
               if not _is_int(v) or not 1 <= v <= MAX_SIDE]
        if not out and self.resize < self.crop:
            out.append(f"preprocessing needs crop <= resize, got crop={self.crop} "
                       f"resize={self.resize}")
        for problem in (
                _numbers_problem("preprocessing.mean", self.mean, count=3, low=0.0, high=1.0),
                _numbers_problem("preprocessing.std", self.std, count=3, low=0.0, high=1.0,
                                 low_inclusive=False)):
            if problem:
                out.append(problem)
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            out.append(f"preprocessing.interpolation must be one of {INTERPOLATIONS}, "
                       f"got {_shown(self.interpolation)}")
        return out

    @classmethod
    def for_crop(cls, crop: int, *, ratio: float = 256 / 224, **kw: Any) -> Preprocessing:
        """Preprocessing for a crop size, keeping the resize/crop ratio of the weights."""
        return cls(resize=max(crop, round(crop * ratio)), crop=crop, **kw)


@dataclass
class ModelCard:
    """Everything about a checkpoint except its weights."""

    name: str
    arch: str
    task: str
    classes: list[str]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    thresholds: list[float] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    allow_half: bool = True
    stem: str = "imagenet"
    created_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION
    weights_sha256: str | None = None  # of model.safetensors, written by save()

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def problems(self) -> list[str]:
        """What is wrong with this card (empty when valid)."""
        out = self._field_type_problems()
        if not _is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            out.append(f"format_version {_shown(self.format_version)} is not supported "
                       f"(this code reads {FORMAT_VERSION})")
        for what, value, known in (("arch", self.arch, tuple(ARCHITECTURES)),
                                   ("stem", self.stem, tuple(STEMS)), ("task", self.task, TASKS)):
            if not isinstance(value, str) or value not in known:
                out.append(f"unknown {what} {_shown(value)} (known: {', '.join(known)})")
        if self.weights_sha256 is not None and not _is_sha256(self.weights_sha256):
            out.append(f"weights_sha256 must be 64 hex digits, got {_shown(self.weights_sha256)}")
        classes_problem = _classes_problem(self.classes)
        if classes_problem:
            out.append(classes_problem)
        elif self.thresholds is not None:
            problem = _numbers_problem("thresholds", self.thresholds, count=len(self.classes),
                                       low=0.0, high=1.0)
            if problem:
                out.append(f"{problem} (one per class)")
        return out

    def _field_type_problems(self) -> list[str]:
        """Fields whose JSON type is wrong: strings, objects, the flag, the preprocessing."""
        out = [f"{what} must be a non-empty string, got {_shown(value)}"
               for what, value in (("name", self.name), ("created_at", self.created_at))
               if not isinstance(value, str) or not value]
        out += [f"{what} must be an object, got {_shown(value)}"
                for what, value in (("metrics", self.metrics), ("training", self.training))
                if not isinstance(value, dict)]
        if not isinstance(self.allow_half, bool):
            out.append(f"allow_half must be true or false, got {_shown(self.allow_half)}")
        if not isinstance(self.preprocessing, Preprocessing):
            out.append("preprocessing must be a Preprocessing")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        d = asdict(self)
        d["preprocessing"] = {**asdict(self.preprocessing),
                              "mean": list(self.preprocessing.mean),
                              "std": list(self.preprocessing.std)}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Validate and build a card from parsed JSON."""
        if not isinstance(data, dict):
            raise ValueError(f"card must be a JSON object, got {_shown(data)}")
        if _nesting_depth_exceeds(data, MAX_CARD_DEPTH):
            raise ValueError(f"card nests objects and arrays deeper than {MAX_CARD_DEPTH} levels")
        required = ("name", "arch", "task", "classes", "preprocessing")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing fields {missing}")
        known = set(cls.__dataclass_fields__)
        extra = sorted(k for k in data if k not in known)
        if extra:
            logger.debug("ignoring unknown card fields %s", _shown(extra))
        pre = data["preprocessing"]
        if not isinstance(pre, dict):
            raise ValueError(f"preprocessing must be an object, got {_shown(pre)}")
        missing = [k for k in ("resize", "crop", "mean", "std") if k not in pre]
        if missing:
            raise ValueError(f"preprocessing is missing {missing}")
        preprocessing = Preprocessing(
            resize=pre["resize"], crop=pre["crop"], mean=pre["mean"], std=pre["std"],
            interpolation=pre.get("interpolation", "bilinear"))
        fields = {k: v for k, v in data.items() if k in known and k != "preprocessing"}
        return cls(preprocessing=preprocessing, **fields)


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
    state = {k: v.detach().to("cpu").contiguous() for k, v in _unwrap(model).state_dict().items()}
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[0] != card.num_classes:
        raise ValueError(f"model has {fc.shape[0]} outputs but the card lists "
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
    _check_weights_digest(read_card(directory), _read_weights(directory / WEIGHTS_FILE),
                          directory / WEIGHTS_FILE)


def _check_weights_digest(card: ModelCard, data: bytes, path: Path) -> None:
    if card.weights_sha256 is None:
        return
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.weights_sha256:
        raise CheckpointError(path, (
            f"does not match {CARD_FILE} (sha256 {digest[:12]}..., the card names "
            f"{card.weights_sha256[:12]}...): the two files come from different saves"))


def _read_weights(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and \
        all(c in "0123456789abcdef" for c in value)


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
    data = _read_weights(weights_path)  # hashed and parsed from the same bytes
    _check_weights_digest(card, data, weights_path)
    try:
        state = {k: v.to(map_location) for k, v in load_weights(data).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(weights_path, f"cannot be read ({exc})") from exc
    model = build(card.arch, num_classes=card.num_classes, weights=None, stem=card.stem)
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
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and _holds_checkpoint(p))


def _holds_checkpoint(folder: Path) -> bool:
    try:
        return folder.is_dir() and ((folder / CARD_FILE).exists()
                                    or (folder / WEIGHTS_FILE).exists())
    except OSError:  # e.g. not searchable: listed, and loading it reports the error
        return True


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile
