"""A card's `parent` (the checkpoint a model was trained from): read when well formed,
reported when malformed, absent from older cards, which still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import checkpoint
from models.checkpoint import CheckpointError
from tests.cards import copy_checkpoint, with_field

SHA = "ab" * 32


def test_a_card_with_a_parent_loads_and_one_without_still_does(checkpoint_root: Path,
                                                               tmp_path: Path) -> None:
    older = copy_checkpoint(checkpoint_root / "colors", tmp_path / "older", card_text=lambda c: (
        json.dumps({k: v for k, v in c.items() if k != "parent"})))
    assert "parent" not in json.loads((older / "card.json").read_text())
    assert checkpoint.load(older)[1].parent is None
    child = copy_checkpoint(checkpoint_root / "colors", tmp_path / "child", card_text=with_field(
        "parent", json.dumps({"name": "colors", "weights_sha256": SHA})))
    _model, card = checkpoint.load(child)
    assert card.parent == {"name": "colors", "weights_sha256": SHA}
    assert card.to_dict()["parent"] == card.parent


@pytest.mark.parametrize(("value", "words"), [
    ('"colors"', "parent must be an object with name and weights_sha256"),
    ('{"name": "colors"}', "parent is missing ['weights_sha256']"),
    (json.dumps({"name": "", "weights_sha256": SHA}), "parent.name must be a non-empty string"),
    (json.dumps({"name": 7, "weights_sha256": SHA}), "parent.name must be a non-empty string"),
    (json.dumps({"name": "colors", "weights_sha256": "abc"}),
     "parent.weights_sha256 must be 64 hex digits"),
])
def test_a_malformed_parent_is_reported(checkpoint_root: Path, tmp_path: Path, value: str,
                                        words: str) -> None:
    broken = copy_checkpoint(checkpoint_root / "colors", tmp_path / "broken",
                             card_text=with_field("parent", value))
    with pytest.raises(CheckpointError, match="invalid card") as caught:
        checkpoint.load(broken)
    assert words in str(caught.value)
