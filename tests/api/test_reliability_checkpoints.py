"""Broken checkpoints and odd folder names: each fails alone, listed with its error."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models import checkpoint
from tests.cards import copy_checkpoint, nested, with_field
from tests.serving_helpers import fast_settings, jpeg, running_app

pytestmark = pytest.mark.asyncio(loop_scope="session")

FORGED_LINE = "evil\n2030-01-01 00:00:00 INFO app forged line"
ANSI_NAME = "\x1b[31mred\x1b[0m"


def spoil_weights(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    """A weights edit setting the classifier's weights to `value`."""

    def change(state: dict[str, torch.Tensor]) -> None:
        state["fc.weight"] = torch.full_like(state["fc.weight"], value)

    return change


# folder -> (card edit, weights edit, the file the error names, words it must hold)
BROKEN: dict[str, tuple] = {
    "huge-int": (with_field("preprocessing.resize", "9" * 5000), None, "card.json",
                 "cannot be read"),
    "deep": (with_field("metrics", nested(200_000)), None, "card.json", "too deeply"),
    "nan-mean": (with_field("preprocessing.mean", "[NaN, 0.4, 0.4]"), None, "card.json",
                 "preprocessing.mean"),
    "classes-string": (with_field("classes", '"rgb"'), None, "card.json", "classes"),
    "classes-object": (with_field("classes", '{"red": 0, "green": 1, "blue": 2}'), None,
                       "card.json", "classes"),
    "crop-true": (with_field("preprocessing.crop", "true"), None, "card.json",
                  "preprocessing.crop"),
    "name-number": (with_field("name", "42"), None, "card.json", "name must be"),
    "huge-card": (lambda card: json.dumps(card) + " " * checkpoint.MAX_CARD_BYTES, None,
                  "card.json", "larger than"),
    "nan-weights": (None, spoil_weights(float("nan")), "model.safetensors", "NaN or infinite"),
    "overflowing": (None, spoil_weights(1e38), "model.safetensors", "failed warm-up"),
}


def plant(root: Path, source: Path, names: list[str]) -> None:
    """Write the broken checkpoints `names` (keys of BROKEN) under `root`."""
    for name in names:
        card_text, weights, _, _ = BROKEN[name]
        copy_checkpoint(source, root / name, card_text=card_text, weights=weights)


def assert_listed_as_failed(models: dict[str, dict], names: list[str]) -> None:
    """Each of `names` is listed as failed, its error naming the file and the problem."""
    for name in names:
        _, _, filename, words = BROKEN[name]
        entry = models[name]
        assert entry["status"] == "failed", (name, entry)
        assert filename in entry["error"] and words in entry["error"], (name, entry["error"])


async def test_broken_checkpoints_at_start_up_fail_alone(
        make_checkpoint_dir, checkpoint_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_checkpoint_dir("colors")
    plant(root, checkpoint_root / "colors", list(BROKEN))
    async with running_app(fast_settings(root)) as (http, _app):
        models = {m["name"]: m for m in (await http.get("/models")).json()["models"]}
        assert models["colors"]["status"] == "loaded"
        assert_listed_as_failed(models, list(BROKEN))
        assert (await http.get("/ready")).json()["models"] == ["colors"]
        ok = await http.post("/predict", files={"file": ("g.jpg", jpeg("green"))})
        assert ok.status_code == 200
        assert ok.json()["results"][0]["predictions"][0]["label"] == "green"
        for name in ("nan-mean", "overflowing"):
            r = await http.post("/predict", params={"model": name},
                                files={"file": ("g.jpg", jpeg("green"))})
            assert r.status_code == 404, r.text
        again = await http.post("/models/reload")
        assert again.status_code == 200
        assert sorted(again.json()["unchanged"]) == sorted(["colors", *BROKEN])
    assert not [r for r in caplog.records if r.exc_info], "a broken checkpoint raised"


async def test_broken_checkpoints_added_later_fail_alone_on_reload(
        make_checkpoint_dir, checkpoint_root: Path) -> None:
    root = make_checkpoint_dir("colors")
    async with running_app(fast_settings(root)) as (http, app):
        before = app.state.registry.get("colors")
        plant(root, checkpoint_root / "colors", list(BROKEN))
        r = await http.post("/models/reload")
        assert r.status_code == 200, r.text
        assert sorted(r.json()["failed"]) == sorted(BROKEN)
        assert r.json()["unchanged"] == ["colors"]
        models = {m["name"]: m for m in (await http.get("/models")).json()["models"]}
        assert_listed_as_failed(models, list(BROKEN))
        assert app.state.registry.get("colors") is before and before.batcher.running
        ok = await http.post("/predict", files={"file": ("b.jpg", jpeg("blue"))})
        assert ok.status_code == 200


@pytest.mark.parametrize("damage", ["deep", "huge-int", "nan-mean", "overflowing"])
async def test_a_serving_model_whose_new_version_is_broken_keeps_serving(
        make_checkpoint_dir, checkpoint_root: Path, damage: str) -> None:
    root = make_checkpoint_dir("colors")
    async with running_app(fast_settings(root)) as (http, app):
        before = app.state.registry.get("colors")
        shutil.rmtree(root / "colors")
        card_text, weights, filename, words = BROKEN[damage]
        copy_checkpoint(checkpoint_root / "colors", root / "colors", card_text=card_text,
                        weights=weights)
        r = await http.post("/models/reload")
        assert r.status_code == 200 and words in r.json()["failed"]["colors"], r.text
        info = (await http.get("/models/colors")).json()
        assert info["status"] == "loaded" and "previous version serving" in info["error"]
        assert filename in info["error"]
        assert app.state.registry.get("colors") is before
        ok = await http.post("/predict", files={"file": ("r.jpg", jpeg("red"))})
        assert ok.status_code == 200
        assert ok.json()["results"][0]["predictions"][0]["label"] == "red"


async def test_folder_names_that_break_the_model_name_rule_are_refused(
        make_checkpoint_dir, checkpoint_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    root = make_checkpoint_dir("colors")
    for name in (FORGED_LINE, ANSI_NAME, "has space", "-leading-dash", "x" * 129):
        shutil.copytree(checkpoint_root / "colors", root / name)  # real, loadable checkpoints
    async with running_app(fast_settings(root)) as (http, _app):
        listing = await http.get("/models")
        assert "\x1b" not in listing.text
        models = {m["name"]: m for m in listing.json()["models"]}
        assert sorted(models) == sorted(["colors", ascii(FORGED_LINE), ascii(ANSI_NAME),
                                         ascii("has space"), ascii("-leading-dash"),
                                         ascii("x" * 129)])
        for name, entry in models.items():
            if name != "colors":
                assert entry["status"] == "failed" and entry["card"] is None
                assert "is not a valid model name" in entry["error"]
                assert "\n" not in entry["error"] and "\x1b" not in entry["error"]
        assert (await http.get("/ready")).json()["models"] == ["colors"]
        ok = await http.post("/predict", files={"file": ("r.jpg", jpeg("red"))})
        assert ok.status_code == 200 and ok.json()["model"] == "colors"
        metrics = (await http.get("/metrics")).text
        assert "\x1b" not in metrics and "evil" not in metrics and "has space" not in metrics
        reload = await http.post("/models/reload")
        assert reload.status_code == 200 and reload.json()["failed"] == {}
    for record in caplog.records:
        message = record.getMessage()
        assert "\x1b" not in message and "\n2030-01-01" not in message, message


async def test_sighup_rescan_survives_broken_checkpoints(
        make_checkpoint_dir, checkpoint_root: Path) -> None:
    root = make_checkpoint_dir("colors")
    async with running_app(fast_settings(root, reload_on_sighup=True)) as (http, app):
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        plant(root, checkpoint_root / "colors", ["deep", "huge-int", "classes-object"])
        shutil.copytree(checkpoint_root / "tags", root / "tags")
        os.kill(os.getpid(), signal.SIGHUP)
        registry = app.state.registry
        for _ in range(600):
            if "tags" in registry.loaded_names():
                break
            await asyncio.sleep(0.05)
        models = {m["name"]: m for m in (await http.get("/models")).json()["models"]}
        assert models["tags"]["status"] == "loaded" and models["colors"]["status"] == "loaded"
        assert_listed_as_failed(models, ["deep", "huge-int", "classes-object"])
        r = await http.post("/predict?model=tags", files={"file": ("g.jpg", jpeg("green"))})
        assert r.status_code == 200


async def test_a_checkpoint_folder_that_cannot_be_listed_changes_nothing(
        make_checkpoint_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_checkpoint_dir("colors")
    async with running_app(fast_settings(root, default_model="colors")) as (http, _app):
        real_iterdir = Path.iterdir

        def unlistable(self: Path):
            if self == root:  # what a folder without read permission does (tests run as root)
                raise PermissionError(13, "Permission denied", str(self))
            return real_iterdir(self)

        monkeypatch.setattr(Path, "iterdir", unlistable)
        r = await http.post("/models/reload")
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "cannot be listed" in r.json()["detail"] and "keep serving" in r.json()["detail"]
        ok = await http.post("/predict", files={"file": ("a.jpg", jpeg("red"))})
        assert ok.status_code == 200  # the loaded model was neither removed nor retired
        monkeypatch.undo()
        assert (await http.post("/models/reload")).status_code == 200


async def test_a_card_that_is_a_looping_or_broken_link_is_listed_as_failed(
        make_checkpoint_dir, checkpoint_root: Path) -> None:
    root = make_checkpoint_dir("colors")
    for name, target in (("looping", "card.json"), ("dangling", "nowhere.json")):
        (root / name).mkdir()
        (root / name / "card.json").symlink_to(target)  # card.json -> card.json: ELOOP
    shutil.copytree(checkpoint_root / "colors", root / "looping-with-weights")
    (root / "looping-with-weights" / "card.json").unlink()
    (root / "looping-with-weights" / "card.json").symlink_to("card.json")
    async with running_app(fast_settings(root)) as (http, _app):
        models = {m["name"]: m for m in (await http.get("/models")).json()["models"]}
        assert models["colors"]["status"] == "loaded"
        for name, words in (("looping", "symbolic links"), ("dangling", "missing"),
                            ("looping-with-weights", "symbolic links")):
            assert models[name]["status"] == "failed", models.get(name)
            assert "card.json" in models[name]["error"], models[name]
            assert words in models[name]["error"], models[name]
