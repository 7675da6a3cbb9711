"""Reading checkpoints: whatever a card or weights file holds, the only error is CheckpointError."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.card import ModelCard, Preprocessing
from models.checkpoint import CheckpointError
from tests.cards import copy_checkpoint, nested, with_field


def good_card(checkpoint_root: Path) -> dict:
    """The parsed card of the shared `colors` checkpoint."""
    return json.loads((checkpoint_root / "colors" / "card.json").read_text())


# (case, card text from the good card, words the error must contain)
BROKEN_CARDS: list[tuple[str, Callable[[dict], str], tuple[str, ...]]] = [
    ("5000-digit integer", with_field("preprocessing.resize", "1" * 5000), ("cannot be read",)),
    ("200,000 levels of nesting", with_field("metrics", nested(200_000)), ("too deeply",)),
    ("40 levels of nesting", with_field("training", nested(40)), ("deeper than 32",)),
    ("NaN in mean", with_field("preprocessing.mean", "[NaN, 0.4, 0.4]"), ("mean", "nan")),
    ("infinity in std", with_field("preprocessing.std", "[0.2, Infinity, 0.2]"), ("std", "inf")),
    ("zero std", with_field("preprocessing.std", "[0.2, 0, 0.2]"), ("std",)),
    ("mean outside [0, 1]", with_field("preprocessing.mean", "[0.5, 128, 0.5]"), ("mean",)),
    ("mean as a string", with_field("preprocessing.mean", '"abc"'), ("mean",)),
    ("crop true", with_field("preprocessing.crop", "true"), ("crop", "True")),
    ("crop as a float", with_field("preprocessing.crop", "32.0"), ("crop",)),
    ("resize of a billion", with_field("preprocessing.resize", "1000000000"), ("resize",)),
    ("interpolation as a list", with_field("preprocessing.interpolation", '["bilinear"]'),
     ("interpolation",)),
    ("classes as a string", with_field("classes", '"rgb"'), ("classes", "'rgb'")),
    ("classes as an object", with_field("classes", '{"red": 0, "green": 1, "blue": 2}'),
     ("classes",)),
    ("class names that are numbers", with_field("classes", "[1, 2, 3]"), ("classes",)),
    ("a class name that is null", with_field("classes", '["red", null, "blue"]'), ("classes",)),
    ("a class name of Latin-1 bytes (a lone surrogate)",
     with_field("classes", '["red", "caf\\udce9", "blue"]'), ("classes", "Unicode", "udce9")),
    ("a name holding a lone surrogate", with_field("name", '"x\\ud800"'), ("name", "Unicode")),
    ("name as a number", with_field("name", "5"), ("name",)),
    ("arch as a list", with_field("arch", '["resnet18"]'), ("arch",)),
    ("format_version true", with_field("format_version", "true"), ("format_version",)),
    ("thresholds with NaN", with_field("thresholds", "[0.5, NaN, 0.5]"), ("thresholds",)),
    ("thresholds as a string", with_field("thresholds", '"abc"'), ("thresholds",)),
    ("metrics as a list", with_field("metrics", "[1, 2]"), ("metrics",)),
    ("allow_half as a string", with_field("allow_half", '"yes"'), ("allow_half",)),
    ("a JSON array", lambda card: "[1, 2, 3]", ("JSON object",)),
    ("too large", lambda card: json.dumps(card) + " " * checkpoint.MAX_CARD_BYTES,
     ("larger than",)),
]


@pytest.mark.parametrize(("case", "make", "words"), BROKEN_CARDS,
                         ids=[case for case, _, _ in BROKEN_CARDS])
def test_every_broken_card_is_a_checkpoint_error_naming_the_file(
        tmp_path: Path, checkpoint_root: Path, case: str, make: Callable[[dict], str],
        words: tuple[str, ...]) -> None:
    (tmp_path / "card.json").write_text(make(good_card(checkpoint_root)))
    with pytest.raises(CheckpointError) as raised:
        checkpoint.read_card(tmp_path)
    message = str(raised.value)
    assert "card.json" in message and all(word in message for word in words), message
    assert len(message) <= checkpoint.MAX_MESSAGE_CHARS + len(str(tmp_path)) + 20


@pytest.mark.parametrize("data", [b"\xff\xfe{}", b"{\"name\": ", b""])
def test_undecodable_card_bytes_are_a_checkpoint_error(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "card.json").write_bytes(data)
    with pytest.raises(CheckpointError, match="card.json"):
        checkpoint.read_card(tmp_path)


def test_a_fifo_or_a_folder_as_the_card_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "card.json")  # opening it for reading would block without O_NONBLOCK
    with pytest.raises(CheckpointError, match="not a regular file"):
        checkpoint.read_card(tmp_path)
    (tmp_path / "card.json").unlink()
    (tmp_path / "card.json").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        checkpoint.read_card(tmp_path)


def test_a_valid_card_still_reads_and_round_trips(checkpoint_root: Path) -> None:
    card = checkpoint.read_card(checkpoint_root / "colors")
    assert card.classes == ["red", "green", "blue"] and card.preprocessing.crop == 32
    assert isinstance(card.preprocessing.mean, tuple)
    assert ModelCard.from_dict(card.to_dict()) == card
    tags = checkpoint.read_card(checkpoint_root / "tags")
    assert tags.thresholds == [0.5, 0.3, 0.7]


def test_cards_built_in_code_are_checked_the_same_way() -> None:
    with pytest.raises(ValueError, match="crop"):
        Preprocessing(resize=32, crop=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mean"):
        Preprocessing(mean=(float("nan"), 0.5, 0.5))
    with pytest.raises(ValueError, match="classes"):
        ModelCard(name="x", arch="resnet18", task="single_label",
                  classes="abc")  # type: ignore[arg-type]


def test_error_messages_escape_what_the_card_holds(tmp_path: Path, checkpoint_root: Path
                                                   ) -> None:
    make = with_field("arch", json.dumps("resnet\nINFO forged line \x1b[31m" + "x" * 5000))
    (tmp_path / "card.json").write_text(make(good_card(checkpoint_root)))
    with pytest.raises(CheckpointError) as raised:
        checkpoint.read_card(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 1000
    assert "\\n" in message and "\\x1b" in message


def copy_with_weights(checkpoint_root: Path, tmp_path: Path,
                      change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of `colors` whose weights `change` has edited."""
    return copy_checkpoint(checkpoint_root / "colors", tmp_path / "colors", weights=change)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_weights_holding_nan_or_infinity_are_refused(tmp_path: Path, checkpoint_root: Path,
                                                     value: float) -> None:
    def spoil(state: dict[str, torch.Tensor]) -> None:
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = value

    folder = copy_with_weights(checkpoint_root, tmp_path, spoil)
    with pytest.raises(CheckpointError, match="NaN or infinite") as raised:
        checkpoint.load(folder)
    assert "layer1.0.conv1.weight" in str(raised.value)
    assert "model.safetensors" in str(raised.value)


def test_weights_stored_as_integers_are_refused(tmp_path: Path, checkpoint_root: Path) -> None:
    def as_integers(state: dict[str, torch.Tensor]) -> None:
        state["fc.weight"] = state["fc.weight"].to(torch.int32)

    folder = copy_with_weights(checkpoint_root, tmp_path, as_integers)
    with pytest.raises(CheckpointError, match="floating point"):
        checkpoint.load(folder)


def test_find_checkpoints_lists_odd_folder_names_for_the_caller_to_judge(tmp_path: Path,
                                                                         checkpoint_root: Path
                                                                         ) -> None:
    for name in ("colors", "evil\nname", ".hidden"):
        shutil.copytree(checkpoint_root / "colors", tmp_path / name)
    (tmp_path / "empty").mkdir()
    assert [p.name for p in checkpoint.find_checkpoints(tmp_path)] == ["colors", "evil\nname"]


def test_weights_from_another_save_are_refused_on_load(checkpoint_root: Path,
                                                       tmp_path: Path) -> None:
    first = copy_checkpoint(checkpoint_root / "colors", tmp_path / "first")
    model, card = checkpoint.load(first)
    assert card.weights_sha256 is not None
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    second = checkpoint.save(tmp_path / "second", model, card)
    shutil.copy(second / checkpoint.WEIGHTS_FILE, first / checkpoint.WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="different saves"):
        checkpoint.load(first)
    with pytest.raises(CheckpointError, match="different saves"):
        checkpoint.verify_weights(first)
    assert checkpoint.load(second)[1].weights_sha256 != card.weights_sha256
