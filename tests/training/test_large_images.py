"""512 px end to end: `fit` at `image_size=512` on real photographs, the card's eval
preprocessing, and the server answering a photo of another size exactly as `evaluate` does."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models import checkpoint
from models.architectures import DEFAULT_EVAL_RESIZE_RATIO, build
from models.device import Accelerator
from models.predict import Predictor
from tests.serving_helpers import fast_settings, running_app
from tests.training.conftest import tiny_config
from training.commands.evaluate import build_eval_dataset, score_dataset
from training.context import RunContext
from training.data.load import make_preprocessing
from training.distributed import DistInfo
from training.fit import FitRun
from training.recipe import resolve

pytestmark = pytest.mark.slow

CROP = 512
PHOTO_CLASSES = ("astronaut", "chelsea", "coffee")  # scikit-image photographs, one per class
PER_CLASS = 4
PROBE_SIZE = (700, 450)  # neither the training images' size nor the crop


def _photo(name: str) -> Image.Image:
    """One of scikit-image's sample photographs, as RGB."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()[..., :3]).convert("RGB")


def _windows(picture: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """`count` different windows of a photo (60-90% of each side), a few hundred px each."""
    out = []
    for _ in range(count):
        w, h = (int(side * rng.uniform(0.6, 0.9)) for side in picture.size)
        left = int(rng.integers(0, picture.width - w + 1))
        top = int(rng.integers(0, picture.height - h + 1))
        window = picture.crop((left, top, left + w, top + h))
        out.append(window.resize((int(rng.integers(300, 420)), int(rng.integers(280, 400))),
                                 Image.Resampling.BICUBIC))
    return out


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of real photographs, four JPEGs each, 300-420 px: smaller than the crop."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for name in PHOTO_CLASSES:
        (root / name).mkdir()
        for k, window in enumerate(_windows(_photo(name), PER_CLASS, rng)):
            window.save(root / name / f"{k}.jpg", "JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 700x450 JPEG of a photo the model never saw, in a class folder `evaluate` can read."""
    folder = tmp_path_factory.mktemp("probe")
    (folder / PHOTO_CLASSES[0]).mkdir()
    path = folder / PHOTO_CLASSES[0] / "rocket.jpg"
    _photo("rocket").resize(PROBE_SIZE, Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
    return path


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1000-class resnet18 state dict written here: "pretrained" weights without a download."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file(build("resnet18", num_classes=1000, weights="none").state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, photo_data: Path, local_weights: Path
           ) -> Path:
    """One epoch of resnet18 at 512 px fine-tuned from the local weights; its output folder."""
    out = tmp_path_factory.mktemp("served") / "photos512"
    FitRun(tiny_config(photo_data, out, image_size=CROP, batch_size=4,
                       weights=str(local_weights)), DistInfo()).run()
    return out


@pytest.mark.parametrize(("arch", "weights", "resize"), [
    ("resnet18", "none", 512),  # from scratch: resize = crop
    ("resnet18", "imagenet", 585),  # IMAGENET1K_V1: 256/224
    ("resnet50", "imagenet", 530),  # IMAGENET1K_V2: 232/224
    ("resnet50", "none", 512),
])
def test_the_recipe_gives_512_px_runs_the_weights_eval_ratio(arch, weights, resize, photo_data,
                                                              tmp_path) -> None:
    cfg = tiny_config(photo_data, tmp_path / "out", arch=arch, weights=weights,
                      image_size=CROP)
    recipe = resolve(cfg)
    pre = make_preprocessing(RunContext(cfg, recipe, DistInfo(), Accelerator.create("cpu")))
    assert (pre.crop, pre.resize) == (CROP, resize)
    assert recipe.stem == "imagenet"  # 512 px is far above the small-image stems' range


def test_a_512_px_run_from_scratch_writes_crop_512_resize_512(photo_data, tmp_path) -> None:
    out = tmp_path / "scratch"
    best = FitRun(tiny_config(photo_data, out, image_size=CROP, batch_size=4),
                  DistInfo()).run()
    card = checkpoint.read_card(out)
    assert (card.preprocessing.crop, card.preprocessing.resize) == (CROP, CROP)
    assert card.training["recipe"]["eval_resize_ratio"] == 1.0
    assert card.training["config"]["image_size"] == CROP and card.stem == "imagenet"
    assert np.isfinite(best["accuracy"]) and 0.0 <= best["accuracy"] <= 1.0


def test_a_512_px_fine_tune_writes_the_default_eval_ratio(fitted: Path, local_weights) -> None:
    card = checkpoint.read_card(fitted)
    # a local weights file publishes no ratio: the classic 256/224 is kept
    assert card.preprocessing.crop == CROP
    assert card.preprocessing.resize == round(CROP * DEFAULT_EVAL_RESIZE_RATIO) == 585
    assert card.training["config"]["weights"] == str(local_weights)
    assert card.classes == sorted(PHOTO_CLASSES)


def _evaluate_scores(directory: Path, probe: Path) -> dict[str, float]:
    """The scores `training evaluate` gives the probe image, through the checkpoint."""
    model, card = checkpoint.load(directory)
    predictor = Predictor(model, card, Accelerator.create("cpu", "fp32"))
    outputs, _, failed = score_dataset(predictor, build_eval_dataset(probe.parents[1], card),
                                       batch_size=2, workers=0)
    assert not failed and outputs.shape == (1, len(card.classes) + (card.unknown is not None))
    scores = predictor.scores(torch.as_tensor(outputs))[0].tolist()
    assert max(scores) - min(scores) > 1e-3  # not uniform: the comparison below means something
    return dict(zip(card.classes, scores, strict=True))


@pytest.mark.asyncio(loop_scope="session")
async def test_the_server_scores_a_700x450_photo_as_evaluate_does(fitted: Path,
                                                                  probe: Path) -> None:
    assert Image.open(io.BytesIO(probe.read_bytes())).size == PROBE_SIZE
    expected = _evaluate_scores(fitted, probe)
    settings = fast_settings(fitted.parent, max_batch_size=2)
    async with running_app(settings) as (client, _):
        response = await client.post(
            "/predict", params={"all_scores": "true", "top_k": 3},
            files={"file": (probe.name, probe.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == fitted.name and len(body["results"]) == 1
    result = body["results"][0]
    top = [p["score"] for p in result["predictions"]]
    assert {p["label"] for p in result["predictions"]} == set(PHOTO_CLASSES)
    assert top == sorted(top, reverse=True) and abs(sum(top) - 1.0) < 1e-4
    served = result["scores"]
    assert set(served) == set(expected)
    np.testing.assert_allclose([served[c] for c in expected], list(expected.values()),
                               atol=1e-4)
