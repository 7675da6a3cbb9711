"""The CIFAR ResNets of He et al. 2016 as architecture entries: sizes, shapes, init, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models.architectures import WeightsUnavailableError, arch_spec, build
from models.cam import ClassActivationModel
from models.cifar_resnet import PadShortcut
from models.folding import fold_batch_norms
from models.unknown import WithFeatures
from training.config import TrainConfig
from training.exceptions import ConfigError

# (paper's figure in millions, as printed in its table, at the precision printed)
PAPER_PARAMS = {"resnet20": (0.27, 2), "resnet32": (0.46, 2), "resnet44": (0.66, 2),
                "resnet56": (0.85, 2), "resnet110": (1.7, 1)}
# the exact counts of option A with a 10-class head
EXACT_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
                "resnet56": 853_018, "resnet110": 1_727_962}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(PAPER_PARAMS))
def test_parameter_counts_are_the_papers(arch: str) -> None:
    count = _params(build(arch, num_classes=10))
    paper, digits = PAPER_PARAMS[arch]
    assert count == EXACT_PARAMS[arch]
    assert round(count / 1e6, digits) == paper  # the paper's figure, to its printed precision
    if arch != "resnet110":  # "1.7M" is printed to 2 significant digits: 1.73M is 1.6% off
        assert abs(count - paper * 1e6) / (paper * 1e6) < 0.01


def test_depth_is_6n_plus_2_and_option_b_adds_two_projections() -> None:
    model = build("resnet20", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20
    assert sum(isinstance(m, PadShortcut) for m in model.modules()) == 2
    with_b = build("resnet20b", num_classes=10)
    projections = [m for m in with_b.modules()
                   if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(projections) == 2
    assert _params(with_b) - _params(model) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


@pytest.mark.parametrize("arch", ["resnet20", "resnet32b"])
def test_outputs_and_feature_maps_have_the_papers_shapes(arch: str) -> None:
    model = build(arch, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    maps: list[torch.Size] = []
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda _m, _i, out: maps.append(out.shape))
    with torch.no_grad():
        assert model(x).shape == (3, 10)
    assert maps == [(3, 16, 32, 32), (3, 32, 16, 16), (3, 64, 8, 8)]


def test_he_initialisation_and_unit_batch_norms() -> None:
    torch.manual_seed(0)
    model = build("resnet56", num_classes=10)
    weights = torch.cat([m.weight.detach().flatten() for m in model.modules()
                         if isinstance(m, nn.Conv2d) and m.out_channels == 64
                         and m.in_channels == 64])
    expected_std = (2.0 / (64 * 9)) ** 0.5  # kaiming normal, fan_out = 64 x 3 x 3
    assert abs(float(weights.std()) / expected_std - 1) < 0.02
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_the_head_cam_features_and_folding_fit_the_entry() -> None:
    torch.manual_seed(0)
    model = build("resnet20b", num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    spec = arch_spec("resnet20b")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert spec.head(model).in_features == 64
        cam_logits, maps = ClassActivationModel(model, spec.classifier)(x)
        split_logits, features = WithFeatures(model, spec.classifier)(x)
        folded = fold_batch_norms(model, x, conv_bn_prefixes=spec.conv_bn_prefixes)
        assert torch.allclose(cam_logits, logits, atol=1e-5) and maps.shape == (2, 64, 8, 8)
        assert torch.allclose(split_logits, logits, atol=1e-5) and features.shape == (2, 64)
        assert folded is not model and not any(
            isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert torch.allclose(folded(x), logits, atol=1e-4)


def test_pretrained_weights_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    for weights in ("imagenet", str(tmp_path / "w.pth")):
        with pytest.raises(ConfigError, match="resnet20 has no pretrained weights.*--weights "
                                              "none"):
            TrainConfig(data=tmp_path, output=tmp_path / "out", arch="resnet20", weights=weights)
    with pytest.raises(WeightsUnavailableError, match="--weights none"):
        build("resnet44", num_classes=10, weights="imagenet")


def test_a_stem_option_is_refused_for_their_own_stem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--stem small does not apply to --arch resnet56"):
        TrainConfig(data=tmp_path, output=tmp_path / "out", arch="resnet56", weights="none",
                    stem="small")
    with pytest.raises(ValueError, match="has its own stem"):
        build("resnet56", num_classes=10, stem="small_stride2")
    TrainConfig(data=tmp_path, output=tmp_path / "out", arch="resnet56", weights="none")


@pytest.mark.parametrize("arch", ["resnet20", "resnet20b"])
def test_both_shortcuts_export_to_the_onnx_backend(arch: str) -> None:
    pytest.importorskip("onnxruntime")
    from models.card import Preprocessing
    from models.onnx_backend import OnnxRuntimeModel
    from models.preprocessing import Normalize

    model = build(arch, num_classes=10).eval()
    normalize = Normalize(Preprocessing.for_crop(32, ratio=1.0))
    runtime = OnnxRuntimeModel(model, normalize, task="single_label", classes=10,
                               input_shape=(3, 32, 32), threads=1)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(runtime(x), model(normalize(x)), atol=1e-4, rtol=1e-4)
