"""What a card shows over HTTP: local paths reduced to their names, any text made sendable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.api.card_view import local_path_name, public_card
from models import checkpoint


@pytest.mark.parametrize(("text", "shown"), [
    ("/home/alice/datasets/pets", "pets"),
    ("/home/alice/datasets/pets/", "pets"),
    ("/", "/"),
    ("C:\\Users\\bob\\pets", "pets"),
    ("\\\\server\\share\\pets", "pets"),
    ("pets", None),
    ("data/pets", None),
    ("imagenet", None),
    ("https://example.com/w.pth", None),
])
def test_absolute_paths_are_named_by_their_last_component(text: str, shown: str | None) -> None:
    assert local_path_name(text) == shown


def test_the_public_card_hides_paths_and_escapes_what_utf8_cannot_carry(
        checkpoint_root: Path) -> None:
    card = checkpoint.read_card(checkpoint_root / "colors")
    card.training = {"config": {"data": "/home/alice/caf\udce9", "lr": 0.1},
                     "split": {"source": "--val /srv/val  (seed 3)"}}
    card.metrics = {"caf\udce9": 1.0}
    shown = public_card(card)
    assert shown["training"] == {"config": {"data": "caf\\udce9", "lr": 0.1},
                                 "split": {"source": "--val val  (seed 3)"}}
    assert shown["metrics"] == {"caf\\udce9": 1.0}
    assert shown["classes"] == card.classes
    json.dumps(shown, ensure_ascii=False).encode("utf-8")
    assert card.training["config"]["data"] == "/home/alice/caf\udce9"  # the card is untouched


def test_an_entry_whose_card_cannot_be_sent_is_listed_without_it(
        checkpoint_root: Path) -> None:
    from app.api.routes.model_info import _info
    from app.serving.registry import ModelEntry

    card = checkpoint.read_card(checkpoint_root / "colors")
    card.metrics = {"blob": b"\xff\xfe"}  # only code can put this there: no JSON holds bytes
    info = _info(ModelEntry(name="odd", path=checkpoint_root / "colors", fingerprint=(),
                            card=card))
    assert info.card is None and "cannot be sent as JSON" in info.error
    json.dumps(info.model_dump(mode="json"), allow_nan=False).encode("utf-8")
