"""A CIFAR ResNet trains, exports, reloads and serves like any other checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from models import checkpoint
from models.cam import Explainer
from models.device import Accelerator
from models.predict import Predictor
from models.preprocessing import Normalize


def test_resnet20_fits_exports_and_reloads_with_the_same_outputs(
        tmp_path: Path, single_data: Path, tiny_config) -> None:
    from training.distributed import DistInfo
    from training.fit import FitRun

    out = tmp_path / "r20"
    run = FitRun(tiny_config(single_data, out, arch="resnet20", epochs=1), DistInfo())
    run.run()
    model, card = checkpoint.load(out)
    assert (card.arch, card.stem, card.num_classes) == ("resnet20", "imagenet", 3)
    assert card.training["recipe"]["stem"] == "imagenet"  # the network's own stem, as built
    assert card.unknown is not None and card.calibration is not None
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    normalized = Normalize(card.preprocessing)(x)
    live = run.learner.model.float().cpu().eval()
    with torch.no_grad():
        expected = live(normalized.contiguous(memory_format=torch.channels_last))
        got = model(normalized)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    predictor = Predictor(model, card, Accelerator.create("cpu"))
    explainer = Explainer(predictor.network, card, Accelerator.create("cpu"), head_name="fc")
    (explained,) = explainer.run_batch([(x[0], None)])
    assert explained.cam.shape == (8, 8)
    assert predictor.probabilities(x).shape == (4, 3)
