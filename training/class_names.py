"""Class folder names as `fit` reads them: which names discovery passes over, and how names
are compared (training.data discovers, training.cifar_import writes folders it will read)."""

from __future__ import annotations

import unicodedata

IGNORED_FOLDERS = frozenset({"__MACOSX"})  # resource forks of zip files made on macOS


def nfc(name: str) -> str:
    """A class name in Unicode NFC (macOS writes folder names decomposed, as NFD)."""
    return unicodedata.normalize("NFC", name)


def is_ignored_name(name: str) -> bool:
    """True for a file or folder name that discovery passes over: hidden (`.DS_Store`,
    `._photo.jpg`) or a macOS zip leftover (`__MACOSX`)."""
    return name.startswith(".") or name in IGNORED_FOLDERS
