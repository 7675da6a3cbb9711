"""The architectures the project knows are the entries of models.architectures.ARCHITECTURES:
every command and the card accept exactly those, and no other module lists or singles out
one by name."""

from __future__ import annotations

import argparse
import ast

import pytest

from models import architectures
from models.architectures import ARCHITECTURES
from models.card import ModelCard, Preprocessing
from tests.server_process import ROOT
from tests.unit.test_architecture_entry import SPEC
from training.cli import build_parser


def _arch_choices() -> dict[str, tuple[str, ...]]:
    """Each training command's --arch choices."""
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    return {name: tuple(action.choices) for name, parser in commands.items()
            for action in parser._actions if action.dest == "arch"}


def test_every_command_takes_exactly_the_tables_architectures() -> None:
    choices = _arch_choices()
    assert choices["fit"] == tuple(ARCHITECTURES)
    assert choices["import-torchvision"] == tuple(
        name for name, spec in ARCHITECTURES.items() if spec.imagenet is not None)
    assert set().union(*choices.values()) <= set(ARCHITECTURES)


def _card(arch: str) -> ModelCard:
    return ModelCard(name="m", arch=arch, task="single_label", classes=["a", "b"],
                     preprocessing=Preprocessing.for_crop(32))


def test_a_card_accepts_exactly_the_tables_architectures(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for arch in ARCHITECTURES:
        assert _card(arch).arch == arch
    with pytest.raises(ValueError, match="unknown arch 'oddnet'"):
        _card("oddnet")
    monkeypatch.setitem(architectures.ARCHITECTURES, "oddnet", SPEC)  # one entry, nothing else
    assert _card("oddnet").arch == "oddnet"


def _named(node: ast.AST) -> list[str]:
    """The architecture names a literal collection or a comparison spells out."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = node.elts
    elif isinstance(node, ast.Dict):
        items = [key for key in node.keys if key is not None]
    elif isinstance(node, ast.Compare):
        items = [node.left, *node.comparators]
    else:
        return []
    return [item.value for item in items
            if isinstance(item, ast.Constant) and item.value in ARCHITECTURES]


def test_no_other_module_lists_or_singles_out_an_architecture() -> None:
    """Outside the table, no code compares an architecture with a name or lists three of
    them: a new entry needs no edit elsewhere."""
    found = []
    for folder in ("app", "models", "training"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "models" / "architectures.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = _named(node)
                if names and (isinstance(node, ast.Compare) or len(names) >= 3):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {names}")
    assert found == []
