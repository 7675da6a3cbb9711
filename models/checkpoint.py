"""The checkpoint contract: `model.safetensors` + `card.json`, written and read only here.

A checkpoint is plain values: weights in safetensors (loading never executes code) and a JSON
card that says what the model is, which classes it predicts, and exactly how to preprocess.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.architectures import ARCHITECTURES, STEMS, build

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
TASKS = ("single_label", "multi_label")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file is missing or invalid; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class Preprocessing:
    """The exact eval preprocessing: resize shorter side, center crop, normalize."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not (isinstance(self.crop, int) and isinstance(self.resize, int)):
            raise ValueError("resize and crop must be integers")
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"need 1 <= crop <= resize, got crop={self.crop} "
                             f"resize={self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")

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

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def problems(self) -> list[str]:
        """What is wrong with this card (empty when valid)."""
        out = []
        if self.format_version != FORMAT_VERSION:
            out.append(f"format_version {self.format_version} is not supported "
                       f"(this code reads {FORMAT_VERSION})")
        if self.arch not in ARCHITECTURES:
            out.append(f"unknown arch {self.arch!r} (known: {', '.join(ARCHITECTURES)})")
        if self.stem not in STEMS:
            out.append(f"unknown stem {self.stem!r} (known: {', '.join(STEMS)})")
        if self.task not in TASKS:
            out.append(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.classes or not all(isinstance(c, str) and c for c in self.classes):
            out.append("classes must be a non-empty list of non-empty strings")
        elif len(set(self.classes)) != len(self.classes):
            out.append("classes must be unique")
        if self.thresholds is not None:
            if len(self.thresholds) != len(self.classes):
                out.append(f"thresholds has {len(self.thresholds)} values for "
                           f"{len(self.classes)} classes")
            elif not all(0.0 <= t <= 1.0 for t in self.thresholds):
                out.append("thresholds must lie in [0, 1]")
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
            raise ValueError("card must be a JSON object")
        required = ("name", "arch", "task", "classes", "preprocessing")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing fields {missing}")
        known = set(cls.__dataclass_fields__)
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:
            logger.debug("ignoring unknown card fields %s", sorted(extra))
        pre = data["preprocessing"]
        if not isinstance(pre, dict):
            raise ValueError("preprocessing must be an object")
        try:
            preprocessing = Preprocessing(
                resize=pre["resize"], crop=pre["crop"], mean=tuple(pre["mean"]),
                std=tuple(pre["std"]), interpolation=pre.get("interpolation", "bilinear"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"preprocessing is incomplete: {exc}") from exc
        fields = {k: v for k, v in data.items() if k in known and k != "preprocessing"}
        return cls(preprocessing=preprocessing, **fields)


def save(directory: str | Path, model: nn.Module, card: ModelCard) -> Path:
    """Write `model.safetensors` and `card.json` into `directory` (atomically, file by file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in _unwrap(model).state_dict().items()}
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[0] != card.num_classes:
        raise ValueError(f"model has {fc.shape[0]} outputs but the card lists "
                         f"{card.num_classes} classes")
    with _atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "arch": card.arch})
    with _atomic_path(directory / CARD_FILE) as tmp:
        tmp.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    logger.info("saved checkpoint %s (%s, %d classes)", directory, card.arch, card.num_classes)
    return directory


def read_card(directory: str | Path) -> ModelCard:
    """Read and validate `card.json`, raising CheckpointError naming the file."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise CheckpointError(path, "file is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"is not valid JSON ({exc})") from exc
    try:
        return ModelCard.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"invalid card: {exc}") from exc


def load(directory: str | Path, *, map_location: str | torch.device = "cpu"
         ) -> tuple[nn.Module, ModelCard]:
    """Load and validate a checkpoint; the model is returned in eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(directory, "is not a directory")
    card = read_card(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (f"; found {pickles}, but pickle files are never loaded (they can run code): "
                "export to safetensors") if pickles else ""
        raise CheckpointError(weights_path, f"file is missing{hint}")
    try:
        state = load_file(str(weights_path), device=str(map_location))
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
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, card


def find_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`: every direct subfolder holding a card.json.

    A root that is itself a checkpoint counts as one.
    """
    root = Path(root)
    if (root / CARD_FILE).is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and ((p / CARD_FILE).exists() or (p / WEIGHTS_FILE).exists()))


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


class _atomic_path:  # noqa: N801 - used as a context manager like a function
    """Yield a temp path beside `target`; rename it over `target` on success."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.")
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink(missing_ok=True)
