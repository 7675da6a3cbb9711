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
from tests.serving_helpers import fast_settings, inside, jpeg, running_app

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
    # a class folder named in Latin-1 (b"caf\xe9"), as Python reads it: a lone surrogate
    "classes-latin1": (with_field("classes", '["red", "caf\\udce9", "blue"]'), None,
                       "card.json", "classes must be Unicode text"),
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
        before = inside(app).model("colors")
        plant(root, checkpoint_root / "colors", list(BROKEN))
        r = await http.post("/models/reload")
        assert r.status_code == 200, r.text
        assert sorted(r.json()["failed"]) == sorted(BROKEN)
        assert r.json()["unchanged"] == ["colors"]
        models = {m["name"]: m for m in (await http.get("/models")).json()["models"]}
        assert_listed_as_failed(models, list(BROKEN))
        assert inside(app).model("colors") is before and before.batcher.running
        ok = await http.post("/predict", files={"file": ("b.jpg", jpeg("blue"))})
        assert ok.status_code == 200


@pytest.mark.parametrize("damage", ["deep", "huge-int", "nan-mean", "overflowing"])
async def test_a_serving_model_whose_new_version_is_broken_keeps_serving(
        make_checkpoint_dir, checkpoint_root: Path, damage: str) -> None:
    root = make_checkpoint_dir("colors")
    async with running_app(fast_settings(root)) as (http, app):
        before = inside(app).model("colors")
        shutil.rmtree(root / "colors")
        card_text, weights, filename, words = BROKEN[damage]
        copy_checkpoint(checkpoint_root / "colors", root / "colors", card_text=card_text,
                        weights=weights)
        r = await http.post("/models/reload")
        assert r.status_code == 200 and words in r.json()["failed"]["colors"], r.text
        info = (await http.get("/models/colors")).json()
        assert info["status"] == "loaded" and "previous version serving" in info["error"]
        assert filename in info["error"]
        assert inside(app).model("colors") is before
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
        registry = inside(app).registry
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


async def test_text_no_answer_can_carry_breaks_no_listing(
        make_checkpoint_dir, checkpoint_root: Path) -> None:
    root = make_checkpoint_dir("colors", "tags")
    card = json.loads((root / "tags" / "card.json").read_text())
    card["metrics"] = {"note": "caf\udce9"}  # loads: no class name, nothing served, holds it
    card["training"] = {"config": {"data": "/data/caf\udce9"}}
    (root / "tags" / "card.json").write_text(json.dumps(card))  # "\udce9" escaped in JSON
    plant(root, checkpoint_root / "colors", ["classes-latin1"])
    async with running_app(fast_settings(root, default_model="colors")) as (http, _app):
        listing = await http.get("/models")
        assert listing.status_code == 200, listing.text
        models = {m["name"]: m for m in listing.json()["models"]}
        assert models["colors"]["status"] == "loaded" and models["tags"]["status"] == "loaded"
        assert models["tags"]["card"]["metrics"] == {"note": "caf\\udce9"}
        assert_listed_as_failed(models, ["classes-latin1"])
        for name in ("colors", "tags", "classes-latin1"):
            assert (await http.get(f"/models/{name}")).status_code == 200
        assert (await http.get("/ready")).json()["models"] == ["colors", "tags"]
        ok = await http.post("/predict", files={"file": ("g.jpg", jpeg("green"))})
        assert ok.status_code == 200


async def test_report_figures_are_never_read_through_a_link(
        make_checkpoint_dir, tmp_path: Path) -> None:
    root = make_checkpoint_dir("colors")
    folder = root / "colors"
    figure = b"\x89PNG\r\n\x1a\n" + b"real figure"
    (folder / "curves.png").write_bytes(figure)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "calibration.png").symlink_to(secret)  # a file outside the checkpoint
    (folder / "pr_curves.png").symlink_to(folder / "card.json")  # a file inside it, linked
    (folder / "confusion_matrix.png").symlink_to("/etc/passwd")
    async with running_app(fast_settings(root)) as (http, _app):
        listed = await http.get("/models/colors/reports")
        assert listed.json() == {"reports": ["curves.png"]}
        for name in ("calibration.png", "pr_curves.png", "confusion_matrix.png"):
            r = await http.get(f"/models/colors/reports/{name}")
            assert r.status_code == 404, (name, r.text[:200])
            assert b"root:" not in r.content and b"format_version" not in r.content
        ok = await http.get("/models/colors/reports/curves.png")
        assert ok.status_code == 200 and ok.content == figure
        assert ok.headers["content-type"] == "image/png"
        assert ok.headers["content-length"] == str(len(figure))
        assert ok.headers["x-content-type-options"] == "nosniff"


async def test_cards_show_no_local_data_paths(make_checkpoint_dir) -> None:
    root = make_checkpoint_dir("colors")
    card = json.loads((root / "colors" / "card.json").read_text())
    card["training"] = {
        "config": {"data": "/home/alice/datasets/pets", "output": "/home/alice/runs/pets-r50",
                   "val": "C:\\Users\\bob\\val-pets", "weights": "imagenet", "resume": None},
        "dataset": {"root": "/home/alice/datasets/pets", "train": 10, "val": 2,
                    "skipped": {"examples": ["cat/1.jpg"]}},
        "split": {"source": "--val /srv/private/val-pets", "sha256": "ab" * 32},
    }
    (root / "colors" / "card.json").write_text(json.dumps(card))
    async with running_app(fast_settings(root)) as (http, _app):
        for path in ("/models", "/models/colors"):
            r = await http.get(path)
            assert r.status_code == 200
            for private in ("alice", "bob", "/srv", "private", "Users"):
                assert private not in r.text, (path, private)
        training = (await http.get("/models/colors")).json()["card"]["training"]
        assert training["config"] == {"data": "pets", "output": "pets-r50", "val": "val-pets",
                                      "weights": "imagenet", "resume": None}
        assert training["dataset"]["root"] == "pets"
        assert training["dataset"]["skipped"] == {"examples": ["cat/1.jpg"]}
        assert training["split"]["source"] == "--val val-pets"


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
