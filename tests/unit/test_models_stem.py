"""models/: small-image stems, their card field, and the gentler augmentation option."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import v2 as T

from models import checkpoint
from models.architectures import STEMS, build
from models.card import ModelCard, Preprocessing
from models.checkpoint import CheckpointError
from models.preprocessing import train_transform


@pytest.mark.parametrize(("stem", "side"), [("imagenet", 8), ("small", 32),
                                             ("small_stride2", 16)])
def test_stem_sets_the_resolution_layer1_sees(stem, side):
    model = build("resnet18", num_classes=3, stem=stem).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feature = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        assert feature.shape[-1] == side
        assert model(x).shape == (1, 3)


def test_unknown_stem_is_refused():
    with pytest.raises(ValueError, match="unknown stem"):
        build("resnet18", num_classes=2, stem="tiny")
    with pytest.raises(ValueError, match="unknown stem"):
        ModelCard(name="x", arch="resnet18", task="single_label", classes=["a"], stem="tiny")


def test_pretrained_backbone_loads_under_a_small_stem(tmp_path):
    source = build("resnet18", num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build("resnet18", num_classes=3, weights=path, stem="small")
    assert model.conv1.weight.shape[-1] == 3
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_card_stem_round_trips_and_old_cards_default_to_imagenet(tmp_path):
    model = build("resnet18", num_classes=2, stem="small").eval()
    card = ModelCard(name="s", arch="resnet18", task="single_label", classes=["a", "b"],
                     preprocessing=Preprocessing.for_crop(32, ratio=1.0), stem="small")
    checkpoint.save(tmp_path / "s", model, card)
    loaded, loaded_card = checkpoint.load(tmp_path / "s")
    assert loaded_card.stem == "small"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))

    old = build("resnet18", num_classes=2).eval()
    old_card = ModelCard(name="o", arch="resnet18", task="single_label", classes=["a", "b"])
    checkpoint.save(tmp_path / "o", old, old_card)
    data = json.loads((tmp_path / "o" / "card.json").read_text())
    del data["stem"]  # a card written before stems existed
    (tmp_path / "o" / "card.json").write_text(json.dumps(data))
    assert checkpoint.load(tmp_path / "o")[1].stem == "imagenet"

    data["stem"] = "small"  # weights of the ImageNet stem do not fit the small one
    (tmp_path / "o" / "card.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="conv1.weight"):
        checkpoint.load(tmp_path / "o")
    assert set(STEMS) >= {"imagenet", "small", "small_stride2"}


def test_train_transform_augment_probability():
    pre = Preprocessing.for_crop(32, ratio=1.0)
    partial = train_transform(pre, min_scale=0.5, augment_probability=0.3)
    assert any(isinstance(t, T.RandomApply) and t.p == 0.3 for t in partial.transforms)
    full = train_transform(pre)
    assert any(isinstance(t, T.TrivialAugmentWide) for t in full.transforms)
    off = train_transform(pre, augment_probability=0.0)
    assert not any(isinstance(t, (T.RandomApply, T.TrivialAugmentWide)) for t in off.transforms)
    out = partial(Image.new("RGB", (40, 40), (10, 200, 30)))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
