"""What a model's card shows over HTTP: its values, with the training machine's absolute paths
reduced to their last component and any text that UTF-8 cannot carry escaped.

A card's `training` block records where `fit` read its data and wrote its output, as the
trainer typed them (`/home/alice/datasets/pets`). Whoever may read `/models` need not learn
the trainer's user name or folder layout, so every absolute path in that block, alone or as
a word of a longer value (`--val /srv/val`), is shown as its last component (`pets`).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from models.card import ModelCard

_WORDS = re.compile(r"(\s+)")  # split keeping the separators, so a value keeps its spacing


def public_card(card: ModelCard) -> dict[str, Any]:
    """The card's values as clients see them (see the module docstring)."""
    data = card.to_dict()
    data["training"] = _without_paths(data["training"])
    return _sendable(data)


def local_path_name(text: str) -> str | None:
    """The last component of `text` when it is an absolute POSIX or Windows path, else None."""
    if text.startswith("/"):
        return PurePosixPath(text).name or "/"
    windows = PureWindowsPath(text)
    if windows.drive and windows.root:  # C:\data, \\host\share\data
        return windows.name or windows.anchor
    return None


def _without_paths(value: Any) -> Any:
    """`value` with every absolute path in its strings reduced to its last component."""
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_paths(item) for item in value]
    if not isinstance(value, str):
        return value
    whole = local_path_name(value)
    if whole is not None:
        return whole
    return "".join(local_path_name(word) or word for word in _WORDS.split(value))


def _sendable(value: Any) -> Any:
    """`value` with text that is not valid Unicode (file-name bytes that were not UTF-8, held
    as lone surrogates) escaped as backslash sequences, keys and values alike."""
    if isinstance(value, dict):
        return {_sendable(key): _sendable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_sendable(item) for item in value]
    return sendable_text(value) if isinstance(value, str) else value


def sendable_text(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (lone surrogates) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
