"""Typed declarations become command-line flags in one place, models/flags.py, by one set of
conventions that `python -m training` and `python -m app` both follow."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Literal

import pytest

from app.__main__ import build_parser as app_parser
from app.config import ENV_PREFIX, Settings
from models.flags import REQUIRED, Declaration, FlagSpec, add_flags, flag_name
from training.cli import COMMANDS
from training.cli import build_parser as training_parser
from training.options import option_fields

ROOT = Path(__file__).resolve().parents[2]


def _parser(*declarations: Declaration, env_prefix: str | None = None
            ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, declarations, env_prefix=env_prefix)
    return parser


def _help(parser: argparse.ArgumentParser, dest: str) -> str:
    return next(a.help for a in parser._actions if a.dest == dest) % {}


def test_conventions_spelling_types_choices_and_defaults():
    parser = _parser(
        Declaration("data", Path, "input", spec=FlagSpec(positional=True)),
        Declaration("batch_size", int | None, "images per step", default=None),
        Declaration("mode", Literal["fast", "exact"], "how", default="fast"),
        Declaration("rate", float, "a share of 100%", default=0.5),
        Declaration("amp", bool, "autocast", default=True),
        Declaration("overwrite", bool, "replace", default=False),
        Declaration("keys", list[str], "keys", default=None, computed=True,
                    spec=FlagSpec(flag="--key", repeat=True)),
        Declaration("workers", int, "processes", default=None, computed=True,
                    spec=FlagSpec(default_text="min(4, CPUs)")))
    left_out = vars(parser.parse_args(["d"]))
    assert left_out == {"data": Path("d")}  # the declarations' own defaults apply
    given = vars(parser.parse_args(["d", "--batch-size", "8", "--mode", "exact", "--rate", "1",
                                    "--no-amp", "--overwrite", "--key", "a", "--key", "b",
                                    "--workers", "2"]))
    assert given == {"data": Path("d"), "batch_size": 8, "mode": "exact", "rate": 1.0,
                     "amp": False, "overwrite": True, "keys": ["a", "b"], "workers": 2}
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["d", "--mode", "slow"])
    with pytest.raises(SystemExit):  # a plain switch has no --no- spelling
        parser.parse_args(["d", "--no-overwrite"])
    assert _help(parser, "rate") == "a share of 100% (default: 0.5)"
    assert _help(parser, "batch_size") == "images per step"  # None says nothing
    assert _help(parser, "amp") == "autocast (default: True)"
    assert _help(parser, "overwrite") == "replace"  # a switch is off unless given
    assert _help(parser, "keys") == "keys; repeat for several"
    assert _help(parser, "workers") == "processes (default: min(4, CPUs))"


def test_with_variables_nothing_is_required_and_every_bool_switches_both_ways():
    parser = _parser(Declaration("name", str, "who"),
                     Declaration("verbose", bool, "talk", default=False), env_prefix="P_")
    assert vars(parser.parse_args([])) == {}
    assert vars(parser.parse_args(["--no-verbose"])) == {"verbose": False}
    assert _help(parser, "verbose") == "talk (default: False) [env P_VERBOSE]"
    assert _help(parser, "name") == "who [env P_NAME]"
    required = _parser(Declaration("name", str, "who", default=REQUIRED))
    with pytest.raises(SystemExit):
        required.parse_args([])


def test_a_declaration_that_is_not_one_class_is_refused():
    with pytest.raises(TypeError, match="one class"):
        _parser(Declaration("x", dict[str, int] | int, "mixed", default=None))


def test_only_models_flags_adds_arguments_in_app_and_training():
    """The one place: no other module of app/ or training/ declares a flag by hand (the
    training command's own --verbose aside)."""
    found = []
    for path in sorted([*ROOT.glob("app/**/*.py"), *ROOT.glob("training/**/*.py")]):
        for line in path.read_text(encoding="utf-8").splitlines():
            if ".add_argument(" in line:
                found.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert found == ['training/cli.py: parser.add_argument("-v", "--verbose", '
                     'action="store_true", help="debug logging")']


def _flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.dest not in ("help", "verbose", "command") and a.option_strings]


def _training_subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = training_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_both_entry_points_follow_the_same_conventions():
    app = _flag_actions(app_parser())
    assert {a.dest for a in app} == set(Settings.model_fields)
    spelled = {"api_keys": "--api-key"}  # the one FlagSpec spelling in the settings
    for action in app:
        assert action.default is argparse.SUPPRESS
        assert action.option_strings[0] == spelled.get(action.dest, flag_name(action.dest))
        assert action.help.endswith(f"[env {ENV_PREFIX}{action.dest.upper()}]")
    for name, command in COMMANDS.items():
        specs = {f.name: spec for f, spec in option_fields(command.config)}
        for action in _flag_actions(_training_subparsers()[name]):
            assert action.default is argparse.SUPPRESS
            assert action.option_strings[0] == (specs[action.dest].flag
                                                or flag_name(action.dest))
    port = next(a for a in app if a.dest == "port")
    epochs = next(a for a in _flag_actions(_training_subparsers()["fit"]) if a.dest == "epochs")
    assert re.search(r"\(default: 8000\)", port.help)
    assert re.search(r"\(default: 10\)", epochs.help)
