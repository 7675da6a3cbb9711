"""The serving page's configuration table (docs/serving.md) names every setting, with its flag
and variable."""

from __future__ import annotations

import re
from pathlib import Path

from app.__main__ import build_parser
from app.config import ENV_PREFIX, Settings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def _config_rows() -> dict[str, str]:
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `(\w+)` \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_every_setting_is_documented_with_its_flag_and_variable() -> None:
    rows = _config_rows()
    assert set(rows) == set(Settings.model_fields), (
        f"undocumented: {sorted(set(Settings.model_fields) - set(rows))}; "
        f"documented but gone: {sorted(set(rows) - set(Settings.model_fields))}")
    flags: dict[str, list[str]] = {}
    for action in build_parser()._actions:
        if action.dest in rows:
            flags.setdefault(action.dest, []).extend(action.option_strings)
    for name, row in rows.items():
        assert flags.get(name), f"{name} has no command-line flag"
        for flag in flags[name]:
            assert f"`{flag}`" in row or f"`{flag} " in row, (flag, row)
        assert f"`{ENV_PREFIX}{name.upper()}`" in row, row
