"""The parent of a run started from one of our checkpoints (`fit --weights CHECKPOINT_DIR`):
its card settles the options the weights depend on, its folder is loaded and validated by
models.checkpoint, and its weights are carried into the new network, head rows by class name.

What a parent decides, and what it refuses:

- `--arch` and `--image-size` left out are the parent's (its architecture, its crop); an
  `--arch` or `--stem` other than the parent's is refused (its weights have that shape);
  `--normalize` is refused: the parent's mean, std and interpolation are kept, since its
  weights learned them. The recipe is the fine-tuning one (training.recipe: its learning
  rates, warm-up, batch size), with the parent's stem and resize/crop ratio, and the
  parent's augmentation (its random crop scale, flips, TrivialAugment share, pad-and-crop, as
  its card records them): the images look to the new run as they looked to the parent. On
  digits retrained from a model trained from scratch without TrivialAugment, the
  fine-tuning default of TrivialAugment on every image scored 3 to 6 points lower on the new
  images and 0.3 to 0.7 lower on the old ones (docs/training.md, "Retraining").
- DATA must have the parent's task, and every class of the parent: a class DATA lacks would
  silently disappear from the model that replaces it, so the run stops and names it. Classes
  new in DATA are welcome.
- The whole network is carried over; each row of the classifier head (its weight row and
  bias) goes to the class of the same name in DATA's order, and a class new in DATA keeps
  the fresh row it was built with. With the same classes, the new network's logits before any
  step are the parent's.
- The new card names the parent (`parent`: its name and weights sha256).
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models import checkpoint
from models.architectures import arch_spec
from models.card import ModelCard, Preprocessing
from models.checkpoint import CARD_FILE, WEIGHTS_FILE, CheckpointError
from training.exceptions import ConfigError

if TYPE_CHECKING:
    from training.config import TrainConfig

logger = logging.getLogger(__name__)

NAMED_WEIGHTS = ("imagenet", "none")  # --weights values that are not paths
# The recipe values a run from a parent takes from the parent's card (training.recipe), and
# the values each accepts: (low, high) for a number, bool for a switch.
AUGMENTATION: dict[str, tuple[float, float] | type] = {
    "min_scale": (0.0, 1.0), "hflip": bool, "trivial_augment": (0.0, 1.0), "pad_crop": (0, 1024)}


def names_checkpoint(weights: str) -> bool:
    """True when --weights names a folder holding a card.json: one of our checkpoints."""
    return weights not in NAMED_WEIGHTS and (Path(weights) / CARD_FILE).is_file()


def read_parent_card(weights: str) -> ModelCard | None:
    """The card of the checkpoint --weights names (None when it names none); an unreadable
    or invalid card is a ConfigError naming the flag, the file and the problem."""
    if not names_checkpoint(weights):
        return None
    try:
        return checkpoint.read_card(weights)
    except CheckpointError as exc:
        raise ConfigError(f"--weights {weights} is not a usable checkpoint: {exc}") from exc


def parent_augmentation(card: ModelCard) -> dict[str, Any]:
    """The augmentation the parent was trained with, as its card's recipe records it (a
    value missing or out of its range is left out: the recipe's default applies)."""
    recipe = card.training.get("recipe")
    if not isinstance(recipe, dict):
        return {}
    out = {}
    for name, accepted in AUGMENTATION.items():
        value = recipe.get(name)
        if accepted is bool:
            ok = isinstance(value, bool)
        else:
            low, high = accepted
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and low <= value <= high and (name != "pad_crop" or isinstance(value, int)))
        if ok:
            out[name] = value
    return out


def option_problems(cfg: TrainConfig, card: ModelCard) -> list[str]:
    """Options that contradict the parent checkpoint `card` (empty when none does)."""
    weights, out = cfg.weights, []
    if cfg.arch is not None and cfg.arch != card.arch:
        out.append(f"--arch {cfg.arch} contradicts --weights {weights}, a {card.arch}: "
                   f"leave --arch out (a model trained from a checkpoint keeps its "
                   "architecture) or pass --weights imagenet|none")
    if cfg.stem not in ("auto", card.stem):
        out.append(f"--stem {cfg.stem} contradicts --weights {weights}, whose stem is "
                   f"{card.stem}: leave --stem out")
    if cfg.normalize is not None:
        out.append(f"--normalize does not apply with --weights {weights}: the checkpoint's "
                   "mean and std are kept, as its weights learned them")
    if cfg.task is not None and _task(cfg.task) != card.task:
        out.append(f"--task {cfg.task} contradicts --weights {weights}, a {card.task} model")
    if Path(weights).resolve() == Path(cfg.output).resolve():
        out.append(f"--output is --weights {weights}: write the new model into another "
                   "folder (a server serves both; remove the old one when the new one is "
                   "proven)")
    return out


def _task(flag: str) -> str:
    return flag if flag.endswith("_label") else f"{flag}_label"


@dataclass(frozen=True)
class Parent:
    """A loaded, validated parent checkpoint: its folder, card and network weights."""

    directory: Path
    card: ModelCard
    state: dict[str, torch.Tensor]
    weights_sha256: str

    @property
    def record(self) -> dict[str, Any]:
        """The new card's `parent` field."""
        return {"name": self.card.name, "weights_sha256": self.weights_sha256}

    def preprocessing(self, image_size: int, *, resize_ratio: float) -> Preprocessing:
        """The new card's preprocessing: the parent's mean, std and interpolation, at the
        run's crop and resize/crop ratio."""
        pre = self.card.preprocessing
        return Preprocessing.for_crop(image_size, ratio=resize_ratio, mean=pre.mean,
                                      std=pre.std, interpolation=pre.interpolation)

    @property
    def resize_ratio(self) -> float:
        """The parent's eval resize / crop."""
        pre = self.card.preprocessing
        return pre.resize / pre.crop

    def check_task(self, task: str, data: Path) -> None:
        """Refuse DATA of another task than the parent's."""
        if task != self.card.task:
            raise ConfigError(f"{data} is {task} data, and --weights {self.directory} is a "
                              f"{self.card.task} model: a model trained from a checkpoint "
                              "keeps its task")

    def check_classes(self, classes: Sequence[str], data: Path) -> None:
        """Refuse DATA that lacks some of the parent's classes."""
        have = {_nfc(c) for c in classes}
        lacking = [c for c in self.card.classes if _nfc(c) not in have]
        if lacking:
            shown = ", ".join(repr(c) for c in lacking[:5])
            more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
            raise ConfigError(
                f"{data} has no images of {shown}{more}, classes of --weights "
                f"{self.directory}: the new model could never predict them. Train on the "
                "parent's data and the new images together (e.g. its training folder with "
                "the feedback folder merged in)")

    def carry_into(self, model: nn.Module, classes: Sequence[str]) -> None:
        """Load the parent's weights into `model` (built for `classes`): the whole network,
        and each head row by class name; rows of new classes stay as built."""
        spec = arch_spec(self.card.arch)
        head_prefix = f"{spec.classifier}."
        body = {k: v for k, v in self.state.items() if not k.startswith(head_prefix)}
        missing, unexpected = model.load_state_dict(body, strict=False)
        missing = [k for k in missing if not k.startswith(head_prefix)]
        if missing or unexpected:  # the card's arch and stem built it: a bug if it happens
            raise RuntimeError(f"the parent's weights do not fit: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        old = {_nfc(c): i for i, c in enumerate(self.card.classes)}
        rows = [(new, old[_nfc(c)]) for new, c in enumerate(classes) if _nfc(c) in old]
        head = spec.head(model)
        with torch.no_grad():
            for name, param in head.named_parameters():
                parent_param = self.state[head_prefix + name]
                for new, was in rows:
                    param[new] = parent_param[was]
        fresh = [c for c in classes if _nfc(c) not in old]
        logger.info("started from %s (%s): backbone and %d head rows kept%s",
                    self.directory, self.card.name, len(rows),
                    f", new rows for {', '.join(fresh)}" if fresh else "")


def load_parent(weights: str) -> Parent | None:
    """The checkpoint --weights names, loaded and validated (None when it names none); a
    broken one (card, weights, digest, shapes) is a ConfigError saying what is wrong."""
    if not names_checkpoint(weights):
        return None
    directory = Path(weights)
    try:
        model, card = checkpoint.load(directory)
    except CheckpointError as exc:
        raise ConfigError(f"--weights {weights} is not a usable checkpoint: {exc}") from exc
    digest = card.weights_sha256 or _file_sha256(directory / WEIGHTS_FILE)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Parent(directory, card, state, digest)


def _file_sha256(path: Path) -> str:
    """The sha256 of a file, streamed (a card from before digests names none)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _nfc(name: str) -> str:
    """Class names are compared in NFC, as discovery reads them."""
    return unicodedata.normalize("NFC", name)
