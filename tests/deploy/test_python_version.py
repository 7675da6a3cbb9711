"""One supported Python everywhere: 3.11 or newer (asyncio's timeouts raise TimeoutError)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_python_311_is_required_everywhere() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "Python 3.11+" in readme and not re.search(r"Python 3\.(?:[0-9]|10)\+", readme)
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+)\.(\d+)",
                     (ROOT / "Dockerfile").read_text(), re.M)
    assert base and (int(base[1]), int(base[2])) >= (3, 11), base
    assert sys.version_info >= (3, 11)
