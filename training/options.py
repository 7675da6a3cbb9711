"""Options declared once, as dataclass fields; the command line is generated from them by the
conventions of models.flags (which `python -m app` follows too).

A field made with `option()` carries its help text and, where the conventions do not fit, its
flag spelling, choices, accepted range and argparse details; `identity=True` marks an option
that shapes a run, so that a resume state saved under another value of it is refused
(training.loop.state). `add_options` turns each such field of a config dataclass into one
argument and `from_args` builds the config from what was parsed. A flag left out is absent
from the parsed values, so the field's own default applies: a default is written in one place
only; where it is computed, `describe_defaults` gives --help the words for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from models.flags import REQUIRED, Declaration, FlagSpec, add_flags, flag_name, value_type

Config = TypeVar("Config")
_METADATA_KEY = "option"


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
class OptionSpec(FlagSpec):
    """How one config field appears on the command line (models.flags.FlagSpec), the range
    its values must lie in, and whether it is part of the run's identity."""

    within: Range | None = None  # checked by `range_problems`; None passes where it is the default
    identity: bool = False  # a resume state saved under another value is refused


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING,
           flag: str | None = None, positional: bool = False,
           choices: Sequence[Any] | None = None, within: Range | None = None,
           nargs: str | None = None, const: Any = None, metavar: str | None = None,
           default_text: str | None = None, identity: bool = False) -> Any:
    """A dataclass field that is also a command-line option; no default makes it required."""
    spec = OptionSpec(help=help, flag=flag, positional=positional, choices=choices,
                      within=within, nargs=nargs, const=const, metavar=metavar,
                      default_text=default_text, identity=identity)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_METADATA_KEY: spec})


def option_fields(config: type | object) -> list[tuple[Field, OptionSpec]]:
    """The fields of a config dataclass (or instance) that are options, in order."""
    return [(f, f.metadata[_METADATA_KEY]) for f in dataclasses.fields(config)
            if _METADATA_KEY in f.metadata]


def identity_fields(config: type | object) -> list[str]:
    """The names of the options marked `identity=True`, in order."""
    return [f.name for f, spec in option_fields(config) if spec.identity]


def flag_of(config: type | object, name: str) -> str:
    """The flag that sets the field `name` of `config`."""
    for f, spec in option_fields(config):
        if f.name == name:
            return spec.flag or flag_name(name)
    return flag_name(name)


def declarations(config: type) -> list[Declaration]:
    """Each option field of the dataclass `config` as models.flags reads a declaration."""
    hints = typing.get_type_hints(config)
    out = []
    for f, spec in option_fields(config):
        computed = f.default is MISSING and f.default_factory is not MISSING
        default = REQUIRED if f.default is MISSING and not computed else (
            None if computed else f.default)
        out.append(Declaration(f.name, hints[f.name], spec.help or "", default=default,
                               computed=computed, spec=spec))
    return out


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """Add one argument per option field of the dataclass `config`, in field order."""
    add_flags(parser, declarations(config))


def describe_defaults(config: type, texts: Mapping[str, str]) -> None:
    """Give --help the words for defaults that are computed elsewhere (`texts`, by field)."""
    fields = {f.name: (f, spec) for f, spec in option_fields(config)}
    for name, text in texts.items():
        if name not in fields:
            raise TypeError(f"{config.__name__} has no option {name!r} to describe")
        f, spec = fields[name]
        f.metadata = MappingProxyType(
            {**f.metadata, _METADATA_KEY: dataclasses.replace(spec, default_text=text)})


def from_args(config: type[Config], args: argparse.Namespace) -> Config:
    """The config from parsed arguments: each option given, and the field's default elsewhere."""
    given = vars(args)
    return config(**{f.name: given[f.name] for f, _ in option_fields(config)
                     if f.name in given})


def range_problems(config: object) -> list[str]:
    """Each option of the dataclass instance `config` whose value is outside its Range."""
    problems = []
    hints = typing.get_type_hints(type(config))
    for f, spec in option_fields(config):
        value = getattr(config, f.name)
        if spec.within is None or (value is None and f.default is None):
            continue
        integer = value_type(hints[f.name])[0] is int
        problem = spec.within.problem(spec.flag or flag_name(f.name), value, integer=integer)
        if problem:
            problems.append(problem)
    return problems
