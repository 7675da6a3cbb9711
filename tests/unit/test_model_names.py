"""The model-name rule, applied to checkpoint folders and to the configured default model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.serving.registry import model_name


@pytest.mark.parametrize("folder", ["colors", "resnet50-v2.1", "A_b-c.d", "x" * 128])
def test_valid_folder_names_are_model_names(folder: str) -> None:
    assert model_name(folder) == (folder, None)


@pytest.mark.parametrize("folder", ["colors\n", "evil\nINFO forged", "\x1b[31mred", "a b",
                                    "-dash", ".dot", "x" * 129, "caf\u00e9", "tab\there",
                                    "rtl\u202eexe"])
def test_other_folder_names_are_refused_under_an_escaped_name(folder: str) -> None:
    name, problem = model_name(folder)
    assert problem is not None and "is not a valid model name" in problem
    assert name == ascii(folder) and name.isascii() and name.isprintable()
    assert name in problem and problem.isprintable()


def test_a_default_model_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a valid model name"):
        Settings(default_model="colors\n")
    assert Settings(default_model="colors").default_model == "colors"
