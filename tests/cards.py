"""Helpers that write broken variants of a real checkpoint: edited card text or weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models import checkpoint


def nested(depth: int) -> str:
    """A JSON array nested `depth` levels deep."""
    return "[" * depth + "]" * depth


def with_field(path: str, raw_json: str) -> Callable[[dict], str]:
    """A function: card -> card text with the field at dotted `path` set to raw JSON text
    (which may be anything, valid JSON or not: a 5000-digit number, NaN, deep nesting)."""

    def make(card: dict) -> str:
        *parents, leaf = path.split(".")
        target = card
        for key in parents:
            target = target[key]
        target[leaf] = "@@VALUE@@"
        return json.dumps(card).replace('"@@VALUE@@"', raw_json)

    return make


def copy_checkpoint(source: Path, target: Path, *, card_text: Callable[[dict], str] | None = None,
                    weights: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """Copy the checkpoint `source` to `target`, then edit its card text and/or its weights
    (the card's weights digest, when it has one, follows the edited weights)."""
    shutil.copytree(source, target)
    card = json.loads((target / checkpoint.CARD_FILE).read_text())
    if weights is not None:
        state = load_file(str(target / checkpoint.WEIGHTS_FILE))
        weights(state)
        save_file(state, str(target / checkpoint.WEIGHTS_FILE))
        digest_field = getattr(checkpoint, "WEIGHTS_DIGEST_FIELD", None)
        if digest_field in card:
            data = (target / checkpoint.WEIGHTS_FILE).read_bytes()
            card[digest_field] = hashlib.sha256(data).hexdigest()
    text = card_text(card) if card_text is not None else json.dumps(card)
    (target / checkpoint.CARD_FILE).write_text(text)
    return target
