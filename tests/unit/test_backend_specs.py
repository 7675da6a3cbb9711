"""A serving backend's facts live in its entry of models.backend_specs and nowhere else."""

from __future__ import annotations

import importlib
import re

import pytest

from app.api.schemas import ModelInfo
from app.config import Settings
from models.backend_specs import BACKEND_SPECS, BACKENDS, backend_device, backend_spec
from tests.server_process import ROOT


def test_every_backend_names_its_runner_and_the_settings_take_exactly_the_table() -> None:
    for spec in BACKEND_SPECS.values():
        module, function = spec.runner.split(":")
        assert callable(getattr(importlib.import_module(module), function))
    assert set(Settings.model_json_schema()["properties"]["backend"]["enum"]) == set(BACKENDS)
    schema = ModelInfo.model_json_schema()["properties"]["backend"]
    assert {v for option in schema["anyOf"] for v in option.get("enum", [])} == set(BACKENDS)
    for spec in BACKEND_SPECS.values():
        assert spec.summary in Settings.model_fields["backend"].description


def test_the_device_and_precision_rules_come_from_the_entry() -> None:
    for spec in BACKEND_SPECS.values():
        assert backend_device(spec.name, "cuda") == ("cpu" if spec.cpu_only else "cuda")
        refused = spec.conflicts("cuda", "fp32") is not None or \
            spec.conflicts("cpu", "bf16") is not None
        assert refused == (spec.cpu_only or spec.fp32_only)
        if refused:
            with pytest.raises(ValueError, match=spec.name):
                Settings(backend=spec.name, device="cuda", precision="bf16")
    with pytest.raises(ValueError, match="unknown backend"):
        backend_spec("tensorrt")


def test_no_backend_name_is_spelled_out_anywhere_else() -> None:
    """Outside the table and the runners, no code compares a backend to a literal name."""
    pattern = re.compile(r"""backend\w*\s*(==|!=|in)\s*\(?["'](""" + "|".join(BACKENDS) + ")")
    found = [f"{path.relative_to(ROOT)}:{number}"
             for folder in ("app", "models", "training")
             for path in (ROOT / folder).rglob("*.py")
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if pattern.search(line)]
    assert found == []
    schemas = (ROOT / "app" / "api" / "schemas.py").read_text()
    assert not any(f'"{name}"' in line and "Literal" in line
                   for name in BACKENDS for line in schemas.splitlines())
