"""Options declared once, as dataclass fields; the command line is generated from them.

A field made with `option()` carries its help text and, where the defaults do not fit, its
flag spelling, choices, accepted range and argparse details. `add_options` turns each such
field of a config dataclass into one argument and `from_args` builds the config from what was
parsed. A flag left out is absent from the parsed values, so the field's own default applies:
a default is written in one place only.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, Field, dataclass
from pathlib import Path
from typing import Any, TypeVar

Config = TypeVar("Config")
_METADATA_KEY = "option"
_VALUE_TYPES = (bool, int, float, str, Path)


@dataclass(frozen=True)
class Range:
    """The numbers an option accepts: `low` to `high`, either end open or closed."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def problem(self, shown: str, value: Any, *, integer: bool) -> str | None:
        """Why `value` of the option `shown` is not a finite number in range (None if it is)."""
        kind = int if integer else (int, float)
        if not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value) \
                and self.low <= value <= self.high \
                and not (self.low_open and value == self.low) \
                and not (self.high_open and value == self.high):
            return None
        what = "an integer" if integer else "a finite number"
        low, high = ((f"{int(self.low)}", f"{int(self.high)}") if integer
                     else (f"{self.low:g}", f"{self.high:g}"))
        span = f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return f"{shown} must be {what} in {span}, got {value!r}"


@dataclass(frozen=True)
class OptionSpec:
    """How one config field appears on the command line."""

    help: str
    flag: str | None = None  # its spelling, where it is not `--field-name`
    positional: bool = False
    choices: Sequence[Any] | None = None
    within: Range | None = None  # checked by `range_problems`; None passes where it is the default
    nargs: str | None = None
    const: Any = None  # the value of a bare flag with nargs="?"
    metavar: str | None = None


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING,
           flag: str | None = None, positional: bool = False,
           choices: Sequence[Any] | None = None, within: Range | None = None,
           nargs: str | None = None, const: Any = None, metavar: str | None = None) -> Any:
    """A dataclass field that is also a command-line option; no default makes it required."""
    spec = OptionSpec(help=help, flag=flag, positional=positional, choices=choices,
                      within=within, nargs=nargs, const=const, metavar=metavar)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_METADATA_KEY: spec})


def flag(name: str) -> str:
    """The command-line flag of a field that keeps the usual spelling (`a_b` -> `--a-b`)."""
    return "--" + name.replace("_", "-")


def option_fields(config: type | object) -> list[tuple[Field, OptionSpec]]:
    """The fields of a config dataclass (or instance) that are options, in order."""
    return [(f, f.metadata[_METADATA_KEY]) for f in dataclasses.fields(config)
            if _METADATA_KEY in f.metadata]


def flag_of(config: type | object, name: str) -> str:
    """The flag that sets the field `name` of `config`."""
    for f, spec in option_fields(config):
        if f.name == name:
            return spec.flag or flag(name)
    return flag(name)


def value_type(config: type, name: str) -> type:
    """The type an option's values are parsed to: its annotation without `| None` (of a
    `list[...]` option, which takes several values with nargs, the type of each)."""
    hint = typing.get_type_hints(config)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else hint
    if typing.get_origin(hint) is list and len(typing.get_args(hint)) == 1:
        hint = typing.get_args(hint)[0]  # a list option (nargs): each of its values
    if hint not in _VALUE_TYPES:
        raise TypeError(f"{config.__name__}.{name}: options hold one of {_VALUE_TYPES}, "
                        f"not {hint}")
    return hint


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """Add one argument per option field of the dataclass `config`, in field order."""
    for f, spec in option_fields(config):
        kind = value_type(config, f.name)
        text = _help_text(f, spec)
        if spec.positional:
            parser.add_argument(f.name, type=kind, help=text, metavar=spec.metavar,
                                nargs=spec.nargs)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if kind is bool:  # on or unset (None) by default: --x/--no-x; off: a plain switch
            both = f.default is True or f.default is None
            kwargs["action"] = argparse.BooleanOptionalAction if both else "store_true"
        else:
            details = {"type": kind, "choices": spec.choices, "nargs": spec.nargs,
                       "const": spec.const, "metavar": spec.metavar}
            kwargs.update({k: v for k, v in details.items() if v is not None})
            kwargs["required"] = f.default is MISSING and f.default_factory is MISSING
        parser.add_argument(spec.flag or flag(f.name), **kwargs)


def _help_text(f: Field, spec: OptionSpec) -> str:
    """The help, with the default appended where it is a plain value (argparse-escaped)."""
    text = spec.help
    if f.default not in (MISSING, None) and not isinstance(f.default, bool):
        text += f" (default: {f.default})"
    return text.replace("%", "%%")


def from_args(config: type[Config], args: argparse.Namespace) -> Config:
    """The config from parsed arguments: each option given, and the field's default elsewhere."""
    given = vars(args)
    return config(**{f.name: given[f.name] for f, _ in option_fields(config)
                     if f.name in given})


def range_problems(config: object) -> list[str]:
    """Each option of the dataclass instance `config` whose value is outside its Range."""
    problems = []
    for f, spec in option_fields(config):
        value = getattr(config, f.name)
        if spec.within is None or (value is None and f.default is None):
            continue
        integer = value_type(type(config), f.name) is int
        problem = spec.within.problem(spec.flag or flag(f.name), value, integer=integer)
        if problem:
            problems.append(problem)
    return problems
