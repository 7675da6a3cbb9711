"""Tests reach past the app's HTTP surface only through `inside(app)` (tests/serving_helpers.py):
no other test file names where the app keeps its parts or a batcher's private fields."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
HOOK = TESTS / "serving_helpers.py"
# app.state.<anything>, a batcher's batch function, and the serving core's private fields
REACHES = re.compile(r"\bapp\.state\b|\bstate\.registry\b|\bbatcher\.fn\b"
                     r"|\._(?:incoming|queued|decoder|compute|bound|leases)\b")


def reaches(text: str) -> list[str]:
    """The lines of `text` that reach into the app past the hook."""
    return [line.strip() for line in text.splitlines() if REACHES.search(line)]


def test_only_the_hook_reaches_inside_the_app() -> None:
    found = {str(path.relative_to(TESTS)): hits for path in sorted(TESTS.rglob("*.py"))
             if path not in (HOOK, Path(__file__).resolve())
             and (hits := reaches(path.read_text(encoding="utf-8")))}
    assert not found, f"use tests.serving_helpers.inside(app) instead: {found}"


def test_the_rule_sees_each_kind_of_reach() -> None:
    for line in ("app.state.registry.get('colors')", "batcher.fn = spy",
                 "peak = batcher._incoming", "served._decoder", "getattr(app.state, 'x')"):
        assert reaches(line), line
    assert not reaches("inside(app).model('colors').batcher.running")
