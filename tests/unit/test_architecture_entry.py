"""An architecture is one entry: every module asks it, none knows the names of its parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models import architectures, checkpoint
from models.architectures import ArchSpec, build, classifier_parameters
from models.card import ModelCard, Preprocessing
from models.device import Accelerator
from models.predict import Predictor


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm1(self.mix1(x))) + x


class OddNames(nn.Module):
    """A small ResNet-like net whose parts have none of torchvision's names."""

    def __init__(self, *, weights: object = None, num_classes: int = 10,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        self.entry_conv = nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False)
        self.entry_pool = nn.MaxPool2d(2)
        self.body = _Block(8)
        self.classify = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.entry_pool(self.entry_conv(x)))
        return self.classify(x.mean(dim=(2, 3)))


SPEC = ArchSpec(OddNames, classifier="classify", first_conv="entry_conv",
                stem_pool="entry_pool", conv_bn_prefixes=("mix", "norm"), eval_resize_ratio=1.0)


@pytest.fixture
def odd_arch(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(architectures.ARCHITECTURES, "oddnet", SPEC)
    return "oddnet"


def _trained_a_little(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # batch-norm statistics that folding must carry over
        model.body.norm1.running_mean.uniform_(-0.5, 0.5)
        model.body.norm1.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_a_new_entry_builds_saves_loads_and_serves(odd_arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _trained_a_little(build(odd_arch, num_classes=3))
    card = ModelCard(name="odd", arch=odd_arch, task="single_label", classes=["a", "b", "c"],
                     preprocessing=Preprocessing.for_crop(32, ratio=SPEC.eval_resize_ratio))
    checkpoint.save(tmp_path / "odd", model, card)
    loaded, loaded_card = checkpoint.load(tmp_path / "odd")
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    predictor = Predictor(loaded, loaded_card, Accelerator.create("cpu"))
    folded = predictor.run.model
    assert isinstance(folded.body.norm1, nn.Identity)  # folded by the entry's prefixes
    normalized = predictor.run.normalize(batch)
    with torch.inference_mode():
        expected = torch.softmax(model(normalized), dim=1)
    assert torch.allclose(predictor.probabilities(batch), expected, atol=1e-5)


def test_the_head_and_the_stem_are_found_by_the_entry(odd_arch: str) -> None:
    model = build(odd_arch, num_classes=4, stem="small")
    assert isinstance(model.entry_pool, nn.Identity)
    assert model.entry_conv.kernel_size == (3, 3) and model.entry_conv.stride == (1, 1)
    head = classifier_parameters(model, odd_arch)
    assert [p.shape for p in head] == [torch.Size([4, 8]), torch.Size([4])]
    with pytest.raises(ValueError, match="2 outputs but the card lists 4"):
        card = ModelCard(name="odd", arch=odd_arch, task="single_label",
                         classes=list("abcd"), preprocessing=Preprocessing.for_crop(32))
        checkpoint.save(Path("/nonexistent/never-written"), build(odd_arch, num_classes=2),
                        card)


def test_pretrained_weights_keep_the_backbone_and_renew_a_head_that_does_not_fit(
        odd_arch: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = build(odd_arch, num_classes=7)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build(odd_arch, num_classes=3, weights=path)
    assert torch.equal(model.body.mix1.weight, source.body.mix1.weight)
    assert model.classify.weight.shape == (3, 8)


def test_an_entry_without_imagenet_weights_says_so(odd_arch: str) -> None:
    with pytest.raises(architectures.WeightsUnavailableError, match="--weights none"):
        build(odd_arch, num_classes=3, weights="imagenet")
    assert SPEC.pretrained_resize_ratio("/some/file.pth") == 1.0
