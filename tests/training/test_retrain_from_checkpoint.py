"""`fit DATA --weights CHECKPOINT_DIR`: a run starts from one of our checkpoints. The network
comes over whole, each head row by class name (new classes get fresh rows), the parent's
architecture, stem and preprocessing are kept, a broken or contradicting parent is a
one-line error, and the new card names its parent and loads in the server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.card import Preprocessing
from models.preprocessing import Normalize, eval_transform
from tests.cards import copy_checkpoint
from tests.serving_helpers import CLASSES, color_image, fast_settings, running_app
from training.cli import main
from training.distributed import DistInfo
from training.exceptions import ConfigError, ResumeError
from training.fit import FitRun
from training.recipe import resolve

WHITE = "white"  # a class the parent does not know


def _write_colors(root: Path, names: list[str], per_class: int = 8) -> Path:
    """Class folders of noisy coloured PNGs (white: a light grey image)."""
    for name in names:
        (root / name).mkdir(parents=True)
        for seed in range(per_class):
            image = (color_image(name, seed=seed) if name != WHITE
                     else color_image("red", seed=seed).convert("L").point(lambda v: 200 + v // 5)
                     .convert("RGB"))
            image.save(root / name / f"{seed}.png")
    return root


@pytest.fixture(scope="module")
def colors_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """red, green, blue: the parent's classes (which it lists in that order)."""
    return _write_colors(tmp_path_factory.mktemp("colors"), list(CLASSES))


def _run(tiny_config, data: Path, out: Path, parent: Path, **overrides: object) -> FitRun:
    """A FitRun from `parent`, built (the network ready) but not run."""
    values = dict(weights=str(parent), arch=None, image_size=None, **overrides)
    return FitRun(tiny_config(data, out, **values), DistInfo())


def _logits(model: torch.nn.Module, pre: Preprocessing) -> torch.Tensor:
    transform = eval_transform(pre)
    batch = torch.stack([transform(color_image(n, seed=99)) for n in CLASSES])
    with torch.no_grad():
        return model.eval()(Normalize(pre)(batch))


def test_same_classes_start_where_the_parent_is(tiny_config, colors_data, checkpoint_root,
                                                tmp_path):
    parent, card = checkpoint.load(checkpoint_root / "colors")
    run = _run(tiny_config, colors_data, tmp_path / "child", checkpoint_root / "colors")
    cfg, model = run.ctx.cfg, run.learner.model
    assert (cfg.arch, cfg.image_size, run.ctx.recipe.stem) == (card.arch, 32, card.stem)
    assert run.data.preprocessing == card.preprocessing
    assert run.ctx.recipe.lr == 1e-3 and run.ctx.recipe.backbone_lr_scale == 0.1  # fine-tuning
    assert run.ctx.recipe.normalize == "parent"
    # DATA's classes are sorted folder names, the parent's another order: rows go by name
    order = [card.classes.index(name) for name in run.data.classes]
    assert order != [0, 1, 2]
    mine = model.state_dict()
    for key, value in parent.state_dict().items():
        assert torch.equal(mine[key].cpu(), value[order] if key.startswith("fc.") else value), key
    assert torch.allclose(_logits(model, card.preprocessing),
                          _logits(parent, card.preprocessing)[:, order], atol=1e-6)


def test_new_classes_get_new_rows_and_shared_ones_are_copied_by_name(
        tiny_config, checkpoint_root, tmp_path):
    data = _write_colors(tmp_path / "data", [*CLASSES, WHITE])
    parent, card = checkpoint.load(checkpoint_root / "colors")
    run = _run(tiny_config, data, tmp_path / "child", checkpoint_root / "colors")
    assert run.data.classes == ["blue", "green", "red", WHITE]  # another order than the parent's
    new_head, old_head = run.learner.model.fc, parent.fc
    for row, name in enumerate(run.data.classes[:3]):
        was = card.classes.index(name)
        assert torch.equal(new_head.weight[row].detach().cpu(), old_head.weight[was])
        assert torch.equal(new_head.bias[row].detach().cpu(), old_head.bias[was])
    fresh = new_head.weight[3].detach().cpu()
    assert not any(torch.equal(fresh, old_head.weight[i]) for i in range(3))
    assert torch.equal(run.learner.model.layer4[1].conv2.weight.detach().cpu(),
                       parent.layer4[1].conv2.weight)


def test_the_recipe_is_fine_tuning_with_the_parents_augmentation(tiny_config, colors_data,
                                                                  checkpoint_root, tmp_path):
    recorded = {"trivial_augment": 0.0, "min_scale": 0.9, "hflip": False, "pad_crop": "4",
                "lr": 0.5}
    parent = copy_checkpoint(checkpoint_root / "colors", tmp_path / "parent", card_text=lambda c: (
        json.dumps({**c, "training": {"recipe": recorded}})))
    cfg = tiny_config(colors_data, tmp_path / "o", weights=str(parent), arch=None,
                      image_size=None, batch_size=None)
    recipe = resolve(cfg)
    assert (recipe.trivial_augment, recipe.min_scale, recipe.hflip) == (0.0, 0.9, False)
    assert recipe.pad_crop == 0  # not an integer in the card: the default
    assert (recipe.lr, recipe.backbone_lr_scale, recipe.batch_size) == (1e-3, 0.1, 64)
    given = tiny_config(colors_data, tmp_path / "o", weights=str(parent), arch=None,
                        trivial_augment=0.5)
    assert resolve(given).trivial_augment == 0.5  # options given still win


def test_the_card_names_its_parent_and_loads_in_the_server(tiny_config, colors_data,
                                                           checkpoint_root, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(checkpoint_root / "colors", served / "colors")
    run = _run(tiny_config, colors_data, served / "colors-v2", served / "colors", epochs=1)
    run.run()
    card = checkpoint.read_card(served / "colors-v2")
    digest = hashlib.sha256((served / "colors" / "model.safetensors").read_bytes()).hexdigest()
    assert card.parent == {"name": "colors", "weights_sha256": digest}
    assert card.training["recipe"]["normalize"] == "parent"

    async def listed() -> dict:
        async with running_app(fast_settings(served, default_model="colors")) as (http, _):
            return (await http.get("/models/colors-v2")).json()


    shown = asyncio.run(listed())
    assert shown["status"] == "loaded" and shown["card"]["parent"] == card.parent

    # the parent folder now holds another model: resuming the run from it is refused
    model, parent_card = checkpoint.load(served / "colors")
    with torch.no_grad():
        model.fc.bias.add_(0.5)
    checkpoint.save(served / "colors", model, parent_card)
    again = _run(tiny_config, colors_data, served / "colors-v2", served / "colors", epochs=2,
                 resume=Path("auto"))
    with pytest.raises(ResumeError, match="parent-weights-sha256"):
        again.run()


def test_a_multi_label_parent_keeps_its_rows_by_name(tiny_config, checkpoint_root, tmp_path):
    data = tmp_path / "multi"
    (data / "images").mkdir(parents=True)
    rows = ["image,labels"]
    for seed in range(12):
        name = CLASSES[seed % 3]
        color_image(name, seed=seed).save(data / "images" / f"{seed}.png")
        rows.append(f"images/{seed}.png,{name} {WHITE}" if seed % 4 == 0
                    else f"images/{seed}.png,{name}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    parent, card = checkpoint.load(checkpoint_root / "tags")
    run = _run(tiny_config, data / "labels.csv", tmp_path / "child", checkpoint_root / "tags")
    assert run.data.task == "multi_label" and WHITE in run.data.classes
    for row, name in enumerate(run.data.classes):
        if name in card.classes:
            assert torch.equal(run.learner.model.fc.weight[row].detach().cpu(),
                               parent.fc.weight[card.classes.index(name)])


def test_a_parent_of_another_task_or_lacking_classes_is_refused(
        tiny_config, colors_data, checkpoint_root, tmp_path):
    with pytest.raises(ConfigError, match="is single_label data, and --weights .* is a "
                                          "multi_label model"):
        _run(tiny_config, colors_data, tmp_path / "a", checkpoint_root / "tags")
    two = _write_colors(tmp_path / "two", ["green", "red"])
    with pytest.raises(ConfigError, match="has no images of 'blue', classes of --weights"):
        _run(tiny_config, two, tmp_path / "b", checkpoint_root / "colors")


def test_options_that_contradict_the_parent_are_refused(tiny_config, colors_data,
                                                        checkpoint_root, tmp_path):
    parent = checkpoint_root / "colors"
    for overrides, message in (
            ({"arch": "resnet34"}, "--arch resnet34 contradicts --weights"),
            ({"stem": "small"}, "--stem small contradicts --weights"),
            ({"normalize": "dataset"}, "--normalize does not apply with --weights"),
            ({"task": "multi"}, "--task multi contradicts --weights")):
        with pytest.raises(ConfigError, match=message):
            tiny_config(colors_data, tmp_path / "o", **{"weights": str(parent), "arch": None,
                                                       **overrides})
    with pytest.raises(ConfigError, match="--output is --weights"):
        tiny_config(colors_data, parent, weights=str(parent), arch=None)


def test_a_broken_parent_is_a_one_line_error(colors_data, checkpoint_root, tmp_path, caplog):
    bad_weights, bad_card = tmp_path / "bad-weights", tmp_path / "bad-card"
    shutil.copytree(checkpoint_root / "colors", bad_weights)
    (bad_weights / "model.safetensors").write_bytes(b"\0" * 64)
    shutil.copytree(checkpoint_root / "colors", bad_card)
    card = json.loads((bad_card / "card.json").read_text())
    (bad_card / "card.json").write_text(json.dumps({**card, "arch": "lenet"}))
    codes = [main(["fit", str(colors_data), "--output", str(tmp_path / f"o{i}"), "--weights",
                   str(parent), "--workers", "0"]) for i, parent in enumerate((bad_weights,
                                                                              bad_card))]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert codes == [1, 1] and len(errors) == 2
    assert "bad-weights is not a usable checkpoint" in errors[0]
    assert "does not match card.json" in errors[0]
    assert "bad-card is not a usable checkpoint" in errors[1] and "unknown arch" in errors[1]
    assert not (tmp_path / "o0").exists() and not (tmp_path / "o1").exists()
