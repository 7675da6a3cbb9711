"""docs/architecture.md stays the map of the code: it names every module of models/,
training/ and app/, and every file, folder and test it names exists."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architecture.md"
PACKAGES = ("models", "training", "app")


def _modules() -> list[str]:
    """The packages' modules under version control (all of them outside a git checkout)."""
    listed = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    paths = listed.stdout.split() if listed.returncode == 0 and listed.stdout else [
        str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*")]
    return sorted(p for p in paths if p.endswith(".py") and not p.endswith("__init__.py"))


def _named_paths(text: str) -> set[str]:
    """Every repository path the page writes in backticks, `::test` parts included."""
    return {match for match in re.findall(r"`((?:app|models|training|tests|docs|deploy)/[^`\s]*)`",
                                          text)}


def test_every_module_is_on_the_page() -> None:
    text = PAGE.read_text(encoding="utf-8")
    missing = [module for module in _modules() if f"`{module}`" not in text]
    assert missing == [], "add a row for each to docs/architecture.md, 'Every module'"


def test_every_file_folder_and_test_the_page_names_exists() -> None:
    absent = []
    for named in sorted(_named_paths(PAGE.read_text(encoding="utf-8"))):
        path, _, test = named.partition("::")
        if not (ROOT / path).exists():
            absent.append(named)
        elif test:
            tree = ast.parse((ROOT / path).read_text())
            functions = {node.name for node in ast.walk(tree)
                         if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
            if test not in functions:
                absent.append(named)
    assert absent == []
