"""Each recipe default is written once, as an entry of RECIPE_DEFAULTS: `resolve` reads the
table, `--help` describes it, and no option's own help text states a default of its own."""

from __future__ import annotations

import argparse
import itertools
from dataclasses import fields
from pathlib import Path

import pytest

from training.cli import build_parser
from training.config import TrainConfig
from training.options import option_fields
from training.recipe import RECIPE_DEFAULTS, Default, Recipe, resolve

RECIPE_FIELDS = {f.name for f in fields(Recipe)}


def _fit_help() -> dict[str, str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.help % {} for a in sub.choices["fit"]._actions if a.help}


def test_the_table_covers_exactly_the_options_the_recipe_fills():
    unset_means_recipe = {f.name for f, _ in option_fields(TrainConfig)
                          if f.default is None and f.name in RECIPE_FIELDS}
    assert set(RECIPE_DEFAULTS) == unset_means_recipe


def test_help_shows_each_default_as_the_table_describes_it_and_nowhere_else():
    shown = _fit_help()
    for f, spec in option_fields(TrainConfig):
        if f.name not in RECIPE_DEFAULTS:
            continue
        assert "default" not in spec.help, f"{f.name}'s own help states a default"
        assert spec.default_text == RECIPE_DEFAULTS[f.name].describe()
        assert shown[f.name] == f"{spec.help} (default: {RECIPE_DEFAULTS[f.name].describe()})"
    assert "fine-tuning 64, from scratch 32" in shown["batch_size"]
    assert "multi-label from scratch: constant" in shown["schedule"]


def _config(data: str, **options: object) -> TrainConfig:
    return TrainConfig(data=Path(data), output=Path("out"), **options)  # type: ignore[arg-type]


RUN_KINDS = list(itertools.product(["photos", "labels.csv"], ["imagenet", "none"],
                                   ["resnet18", "resnet50"], [32, 96, 224], [2, 30]))


@pytest.mark.parametrize(("data", "weights", "arch", "image_size", "epochs"), RUN_KINDS)
def test_resolve_takes_each_unset_option_from_the_table(data, weights, arch, image_size,
                                                        epochs):
    cfg = _config(data, weights=weights, arch=arch, image_size=image_size, epochs=epochs)
    multi = data.endswith(".csv")
    recipe = resolve(cfg).to_dict()
    expected = {name: default.value(cfg, multi=multi)
                for name, default in RECIPE_DEFAULTS.items()}
    # the rules resolve applies on top of the table: each value only where it means something
    expected["momentum"] = None  # adamw, the optimizer by default, has none
    if not multi:
        expected["pos_weight"] = None
    assert {name: recipe[name] for name in RECIPE_DEFAULTS} == expected


def test_a_changed_entry_changes_the_run(monkeypatch):
    monkeypatch.setitem(RECIPE_DEFAULTS, "label_smoothing", Default(0.25))
    monkeypatch.setitem(RECIPE_DEFAULTS, "batch_size", Default(48, scratch=24))
    assert resolve(_config("photos", weights="none", arch="resnet18")).label_smoothing == 0.25
    assert resolve(_config("photos", weights="none", arch="resnet18")).batch_size == 24
    assert resolve(_config("photos", arch="resnet18")).batch_size == 48
    assert resolve(_config("photos", arch="resnet18", batch_size=7)).batch_size == 7
