"""Class activation maps: exact for GAP + linear heads, peaking where the evidence is."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.architectures import build
from models.cam import CamUnsupportedError, ClassActivationModel, Explainer, class_maps
from models.card import ModelCard, Preprocessing
from models.device import Accelerator
from models.heatmap import heatmap_png, normalized, overlay, upsampled
from models.predict import Predictor
from tests.serving_helpers import CLASSES

CROP = 32


class RedDetector(nn.Module):
    """A GAP + linear classifier whose one feature channel is the red channel: class 0
    ("red") is that channel's mean, the other classes look at nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, kernel_size=1, bias=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[0, 0] = 1.0  # channel 0 <- the red input channel
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            self.fc.weight[0, 0] = 2.0  # class 0 reads channel 0 ...
            self.fc.bias[0] = 8.0  # ... and is the top class whatever the image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def _card(task: str = "single_label") -> ModelCard:
    return ModelCard(name="toy", arch="resnet18", task=task, classes=CLASSES,
                     preprocessing=Preprocessing(resize=CROP, crop=CROP),
                     thresholds=[0.5] * 3 if task == "multi_label" else None)


def _corner_image(row: slice, col: slice) -> torch.Tensor:
    crop = torch.zeros((3, CROP, CROP), dtype=torch.uint8)
    crop[0, row, col] = 255  # a red square on black
    return crop


def test_the_pooled_map_is_the_logit_of_a_real_resnet() -> None:
    torch.manual_seed(0)
    model = build("resnet18", num_classes=3).eval()
    cam_model = ClassActivationModel(model, "fc")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        logits, maps = cam_model(x)
        cams = class_maps(maps, cam_model.head, torch.tensor([2, 0]))
    assert maps.shape == (2, 512, 2, 2)
    assert cams.shape == (2, 2, 2) and cams.dtype == torch.float32
    torch.testing.assert_close(logits, expected)
    # CAM_c(x, y) = (sum_k w_ck A_k(x, y) + b_c) / hw: the map adds up to logit c
    torch.testing.assert_close(cams.sum(dim=(1, 2)), expected[[0, 1], [2, 0]])


def test_the_map_peaks_where_the_selected_channel_is_lit() -> None:
    maps = torch.zeros(1, 8, 4, 4)
    maps[0, 5, 3, 0] = 10.0  # channel 5 lit in the bottom-left corner only
    maps[0, 2] = 3.0  # another channel, everywhere, that the head ignores for class 1
    head = nn.Linear(8, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[1, 5] = 1.0
        head.bias.fill_(0.5)
    with torch.inference_mode():
        cam = class_maps(maps, head, torch.tensor([1]))[0]
    assert divmod(int(cam.argmax()), 4) == (3, 0)
    assert float(cam[3, 0]) == pytest.approx((10.0 + 0.5) / 16)
    assert float(cam.sum()) == pytest.approx(10.0 / 16 + 0.5)  # the pooled logit


@pytest.mark.parametrize(("rows", "cols", "corner"), [
    (slice(0, 8), slice(0, 8), (0, 0)), (slice(24, 32), slice(24, 32), (1, 1))])
def test_the_explainer_finds_the_red_square(rows: slice, cols: slice,
                                            corner: tuple[int, int]) -> None:
    explainer = Explainer(RedDetector().eval(), _card(), Accelerator.create("cpu", "fp32"),
                          head_name="fc")
    [found] = explainer.run_batch([(_corner_image(rows, cols), None)])
    assert found.class_index == 0  # the only logit off zero
    assert found.cam.shape == (CROP, CROP)  # a 1x1 conv keeps the resolution
    y, x = divmod(int(found.cam.argmax()), CROP)
    assert (y // (CROP // 2), x // (CROP // 2)) == corner
    heat = upsampled(normalized(found.cam.numpy()), (CROP, CROP))
    assert heat[rows, cols].mean() == pytest.approx(1.0)
    assert heat.mean() < 0.2


def test_a_named_class_is_explained_with_its_served_score() -> None:
    explainer = Explainer(RedDetector().eval(), _card("multi_label"),
                          Accelerator.create("cpu", "fp32"), head_name="fc")
    crop = _corner_image(slice(0, 8), slice(0, 8))
    top, asked = explainer.run_batch([(crop, None), (crop, 2)])
    assert (top.class_index, asked.class_index) == (0, 2)
    assert asked.score == pytest.approx(0.5)  # sigmoid of a zero logit
    assert 0.0 < top.score < 1.0
    assert float(asked.cam.abs().max()) == 0.0  # class 2 reads nothing: a flat map


def test_the_predictors_network_is_explained_without_a_copy(trained_model) -> None:
    model, pre = trained_model
    card = ModelCard(name="colors", arch="resnet18", task="single_label", classes=CLASSES,
                     preprocessing=pre)
    accelerator = Accelerator.create("cpu", "fp32")
    predictor = Predictor(model, card, accelerator)
    explainer = Explainer(predictor.network, card, accelerator, head_name="fc")
    assert explainer.model.head is predictor.network.fc
    crops = [_corner_image(slice(0, CROP), slice(0, CROP))]
    [found] = explainer.run_batch([(crops[0], None)])
    expected = predictor.scores(predictor.run_batch(crops))[0]
    assert found.class_index == CLASSES.index("red") == int(expected.argmax())
    assert found.score == pytest.approx(float(expected.max()), abs=1e-5)


def test_a_model_without_global_pooling_is_refused() -> None:
    with pytest.raises(CamUnsupportedError, match="global average pooling"):
        ClassActivationModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), "fc")


def test_normalized_maps_lie_in_zero_to_one() -> None:
    values = normalized(np.array([[-3.0, 1.0], [5.0, 0.0]]))
    assert values.min() == 0.0 and values.max() == 1.0
    assert normalized(np.full((3, 3), 7.0)).max() == 0.0  # flat: no hot spot to show
    big = upsampled(values, (40, 30))
    assert big.shape == (30, 40) and big.min() >= 0.0 and big.max() <= 1.0


def test_the_heatmap_is_the_crop_with_the_map_over_it() -> None:
    crop = np.full((CROP, CROP, 3), 128, dtype=np.uint8)
    cam = np.zeros((4, 4))
    cam[0, 0] = 1.0
    blended = overlay(crop, cam)
    assert blended.shape == crop.shape and blended.dtype == np.uint8
    assert not np.array_equal(blended[0, 0], blended[-1, -1])  # hot and cold differ
    png = heatmap_png(torch.from_numpy(crop.transpose(2, 0, 1).copy()), torch.from_numpy(cam))
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG" and decoded.size == (CROP, CROP) and decoded.mode == "RGB"
