"""Options: each is one config field whose flag the command line is generated from; a bad
value is one line naming the flag, an internal error keeps its traceback."""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import MISSING
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.architectures import build
from training.cli import COMMANDS, build_parser, main
from training.config import TrainConfig
from training.options import flag_of, from_args, option_fields

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TRAINING_PAGE = ROOT / "docs" / "training.md"  # every option, where the README is brief


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "--epochs must be an integer in [1, 100000], got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer in [1, 1000000], got 0"),
    (["--image-size", "0"], "--image-size must be an integer in [16, 4096], got 0"),
    (["--label-smoothing", "2"], "--label-smoothing must be a finite number in [0, 1), got 2"),
    (["--min-scale", "2"], "--min-scale must be a finite number in (0, 1], got 2"),
    (["--lr", "inf"], "--lr must be a finite number in (0, 10], got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number in [0, 10], got nan"),
    (["--freeze-epochs", "3", "--epochs", "2"], "--freeze-epochs (3) must not exceed --epochs"),
    (["--patience", "-1"], "--patience must be an integer in [1, 100000], got -1"),
    (["--workers", "-1"], "--workers must be an integer in [0, 1024], got -1"),
    (["--resume", "--overwrite"], "pass one of them"),
])
def test_bad_fit_options_are_one_line_errors(args, message, single_data, tmp_path, caplog):
    out = tmp_path / "out"
    code = main(["fit", str(single_data), "--output", str(out), "--weights", "none", *args])
    assert code == 1 and not out.exists()
    errors = _errors(caplog)
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]


def test_output_that_is_a_file_and_weights_that_are_a_folder(single_data, tmp_path, caplog):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    assert main(["fit", str(single_data), "--output", str(taken), "--weights", "none"]) == 1
    assert taken.read_text() == "not a folder"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    assert main(["fit", str(single_data), "--output", str(tmp_path / "o"), "--weights",
                 str(folder)]) == 1
    first, second = _errors(caplog)
    assert "--output" in first and "is a file; it must be a folder" in first
    assert "is a folder, not a .pth/.safetensors file; did you mean" in second


def test_internal_error_is_not_disguised_as_a_user_error(monkeypatch, single_data, tmp_path):
    def broken_fit(*args: object, **kwargs: object) -> None:
        raise ValueError("an internal bug")

    monkeypatch.setattr("training.fit.fit", broken_fit)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["fit", str(single_data), "--output", str(tmp_path / "o"), "--weights", "none"])


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", "7"], "--classes must be in [2, 6] for --task single"),
    (["--classes", "1"], "--classes must be in [2, 6] for --task single"),
    (["--per-class", "0"], "--per-class must be at least 1"),
    (["--size", "8"], "--size must be in [16, 4096]"),
])
def test_synth_refuses_what_it_cannot_make(args, message, tmp_path, caplog):
    assert main(["synth", str(tmp_path / "d"), *args]) == 1
    assert not (tmp_path / "d").exists()
    errors = _errors(caplog)
    assert len(errors) == 1 and message in errors[0]


def test_safetensors_weights_saved_from_ddp_lose_their_prefix(tmp_path):
    torch.manual_seed(1)
    net = build("resnet18", num_classes=3)
    path = tmp_path / "ddp.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = build("resnet18", num_classes=3, weights=str(path))
    torch.testing.assert_close(loaded.conv1.weight, net.conv1.weight)
    torch.testing.assert_close(loaded.fc.weight, net.fc.weight)


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_option_is_one_field_with_its_help_and_its_default(name):
    config = COMMANDS[name].config
    # "x.csv": a path that every required path option takes (predict reads the format from
    # the output's suffix)
    required = {f.name: Path("x.csv") for f, _ in option_fields(config)
                if f.default is MISSING and f.default_factory is MISSING}
    argv = [name]
    for f, spec in option_fields(config):
        if f.name in required:
            argv += ["x.csv"] if spec.positional else [flag_of(config, f.name), "x.csv"]
    # The command line and a config made in code agree on every default.
    assert from_args(config, build_parser().parse_args(argv)) == config(**required)
    actions = [a for a in _subcommand_parsers()[name]._actions if a.dest != "help"]
    assert sorted(a.dest for a in actions) == sorted(f.name for f, _ in option_fields(config))
    assert [a.dest for a in actions if not a.help] == []


def test_a_bare_resume_continues_the_state_in_the_output_folder():
    def resume(*args: str) -> Path | None:
        parsed = build_parser().parse_args(["fit", "d", "--output", "o", *args])
        return from_args(TrainConfig, parsed).resume

    assert resume() is None
    assert resume("--resume") == resume("--resume", "auto") == Path("o") / "last.pt"
    assert resume("--resume", "runs/old.pt") == Path("runs/old.pt")


def test_every_flag_the_docs_show_for_training_exists():
    section = README.read_text(encoding="utf-8").split("\n## Training", 1)[1].split("\n## ", 1)[0]
    text = section + TRAINING_PAGE.read_text(encoding="utf-8")
    prose = re.sub(r"torchrun [^`\n]*", "", text)  # torchrun's own flags
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", prose))
    known = {flag for parser in (build_parser(), *_subcommand_parsers().values())
             for action in parser._actions for flag in action.option_strings}
    assert len(shown) > 20 and shown <= known, sorted(shown - known)
