"""Command-line flags from typed declarations: one convention for every entry point.

`python -m training` declares its options as dataclass fields, `python -m app` as the fields
of its pydantic Settings; each entry point reads its fields into `Declaration`s and
`add_flags` turns every one into one argparse argument by the same rules:

- the flag is `--name-with-dashes`, unless the declaration's `FlagSpec` spells it otherwise;
- a flag left out is absent from the parsed values (argparse.SUPPRESS), so the declaration's
  own default applies: a default is written in one place only;
- values are parsed by the annotation's class: `T | None` as T, `list[T]` as T (taking the
  spec's `nargs`, or each repeat of the flag with `repeat`), `Literal[...]` as its choices;
- a bool is `--x/--no-x` where it can be switched either way, a plain switch where it is off
  and nothing else can turn it on;
- the help shows the default where it says something: a plain value, or the spec's
  `default_text` where the default is computed;
- with `env_prefix`, each value may come from the variable PREFIX+NAME instead (the help
  names it), so no flag is required and every bool can be switched off.

Here because both `app` and `training` use it and neither may import the other; it needs
only the standard library.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

REQUIRED = object()  # the default of a declaration that has none


@dataclass(frozen=True)
class FlagSpec:
    """How one declaration appears on the command line, where the conventions do not say."""

    help: str | None = None  # where the declaration carries no description of its own
    flag: str | None = None  # its spelling, where it is not `--field-name`
    positional: bool = False
    choices: Sequence[Any] | None = None  # else a Literal annotation's values, if any
    nargs: str | None = None
    const: Any = None  # the value of a bare flag with nargs="?"
    metavar: str | None = None
    repeat: bool = False  # a list given one value per use of the flag
    default_text: str | None = None  # what --help says of a default that is computed


@dataclass(frozen=True)
class Declaration:
    """One typed field as the flag conventions read it."""

    name: str
    annotation: Any
    help: str
    default: Any = REQUIRED  # REQUIRED, a plain value, or None
    computed: bool = False  # the default comes from a factory (never shown as a value)
    spec: FlagSpec = FlagSpec()

    @property
    def flag(self) -> str:
        """The flag that sets it."""
        return self.spec.flag or flag_name(self.name)


def flag_name(name: str) -> str:
    """The usual spelling of a field's flag (`a_b` -> `--a-b`)."""
    return "--" + name.replace("_", "-")


def value_type(annotation: Any) -> tuple[type, tuple[Any, ...] | None]:
    """The class each value is parsed to, and the choices a Literal allows (else None)."""
    hint = annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else hint
    if typing.get_origin(hint) is list and len(typing.get_args(hint)) == 1:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    if not isinstance(hint, type):
        raise TypeError(f"a flag's values are of one class, not {annotation}")
    return hint, None


def add_flags(parser: argparse.ArgumentParser, declarations: Iterable[Declaration], *,
              env_prefix: str | None = None) -> None:
    """Add one argument per declaration, in order, by the conventions of this module."""
    for decl in declarations:
        kind, literal = value_type(decl.annotation)
        text = help_text(decl, env_prefix=env_prefix, switch=_is_switch(decl, kind, env_prefix))
        spec = decl.spec
        if spec.positional:
            parser.add_argument(decl.name, type=kind, help=text, metavar=spec.metavar,
                                nargs=spec.nargs)
            continue
        kwargs: dict[str, Any] = {"dest": decl.name, "default": argparse.SUPPRESS, "help": text}
        if kind is bool:
            kwargs["action"] = ("store_true" if _is_switch(decl, kind, env_prefix)
                                else argparse.BooleanOptionalAction)
        else:
            details = {"type": kind, "choices": spec.choices or literal, "nargs": spec.nargs,
                       "const": spec.const, "metavar": spec.metavar,
                       "action": "append" if spec.repeat else None}
            kwargs.update({k: v for k, v in details.items() if v is not None})
            kwargs["required"] = decl.default is REQUIRED and env_prefix is None
        parser.add_argument(decl.flag, **kwargs)


def _is_switch(decl: Declaration, kind: type, env_prefix: str | None) -> bool:
    """A bool that is off and that nothing but the flag turns on: one spelling suffices."""
    return kind is bool and decl.default is False and env_prefix is None


def help_text(decl: Declaration, *, env_prefix: str | None = None, switch: bool = False
              ) -> str:
    """The declaration's help, its default where that says something, and its variable
    (argparse-escaped)."""
    text = decl.help + ("; repeat for several" if decl.spec.repeat else "")
    shown = shown_default(decl, switch=switch)
    if shown is not None:
        text += f" (default: {shown})"
    if env_prefix is not None:
        text += f" [env {env_prefix}{decl.name.upper()}]"
    return text.replace("%", "%%")


def shown_default(decl: Declaration, *, switch: bool = False) -> str | None:
    """What --help says the default is: the spec's text, else a plain value (not None, an
    empty value, a computed one, or the off state of a plain switch)."""
    if decl.spec.default_text is not None:
        return decl.spec.default_text
    value = decl.default
    if value is REQUIRED or value is None or decl.computed or switch:
        return None
    if isinstance(value, (bool, int, float, str, Path)) and value != "":
        return str(value)
    return None
