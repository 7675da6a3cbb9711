"""The unknown-input rule end to end: `fit` stores the stage score's state and the threshold
that accepts 95% of its own validation images, which flags photographs shown to a shapes
model; `evaluate --unknown` reports accepted and rejected shares and the AUROC; `/predict`
flags (and with reject_unknown, empties) exactly the images evaluate rejects; the state is
validated at load; checkpoints with the older cosine rule still load and serve; torch and
ONNX Runtime give the same scores, multi-label models included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import checkpoint
from models.device import Accelerator
from models.predict import Predictor
from models.preprocessing import Normalize, eval_transform
from models.unknown import (
    ACCEPTANCE,
    CLASS_MEANS_KEY,
    COSINE,
    METHOD,
    WithFeatures,
    class_means,
    cosine_distance,
)
from models.unknown_stages import STANDARDISE_KEY, stage_key
from tests.cards import copy_checkpoint
from tests.serving_helpers import fast_settings, running_app
from tests.training.conftest import tiny_config
from training.commands.evaluate import evaluate_checkpoint, score_dataset
from training.commands.synth import generate
from training.config import EvaluateConfig, SynthConfig
from training.data.datasets import ImageDataset
from training.data.discovery import discover, unlabelled_samples


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A two-epoch run with its own validation folder, unseen shapes, and real photographs
    as other data."""
    import skimage.data

    from training.distributed import DistInfo
    from training.fit import FitRun

    root = tmp_path_factory.mktemp("unknown")
    train = generate(SynthConfig(out=root / "train", size=32, per_class=16, classes=3, seed=3))
    val = generate(SynthConfig(out=root / "val", size=32, per_class=14, classes=3, seed=5))
    test = generate(SynthConfig(out=root / "test", size=32, per_class=14, classes=3, seed=7))
    other = root / "photos"
    other.mkdir()
    rng = np.random.default_rng(0)
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        picture = getattr(skimage.data, name)()[..., :3]
        for k in range(5):
            y, x = int(rng.integers(0, picture.shape[0] - 96)), int(rng.integers(0, 200))
            Image.fromarray(picture[y:y + 96, x:x + 96]).save(other / f"{name}{k}.png")
    out = root / "ckpt"
    FitRun(tiny_config(train, out, val=val, epochs=2), DistInfo()).run()
    return {"train": train, "val": val, "test": test, "other": other, "ckpt": out}


def _served_scores(directory: Path, folder: Path) -> tuple[np.ndarray, list[Path]]:
    model, card = checkpoint.load(directory)
    predictor = Predictor(model, card, Accelerator.create("cpu", "fp32"))
    samples = unlabelled_samples(folder)
    dataset = ImageDataset(samples, card.classes, "multi_label",
                           eval_transform(card.preprocessing),
                           decode_size=card.preprocessing.resize)
    outputs, _, failed = score_dataset(predictor, dataset, batch_size=16, workers=0)
    assert not failed
    scores = predictor.unknown_scores(torch.as_tensor(outputs)).numpy()
    return scores, [s.path for s in samples]


def test_fit_stores_the_threshold_accepting_95_percent_of_validation(run) -> None:
    card = checkpoint.read_card(run["ckpt"])
    assert card.unknown is not None and card.unknown["method"] == METHOD
    assert card.unknown["acceptance"] == ACCEPTANCE and card.unknown["stages"] == 4
    metrics = json.loads((run["ckpt"] / "metrics.json").read_text())
    assert metrics["unknown"]["threshold"] == card.unknown["threshold"]
    # the validation folder scored again through the served path: 95% at or under the cut
    # (batch norms are folded for serving, so one image at the boundary may move)
    scores, _ = _served_scores(run["ckpt"], run["val"])
    accepted = float(np.mean(scores <= card.unknown_threshold))
    assert abs(accepted - card.unknown["val_accepted"]) <= 1.5 / len(scores)
    assert accepted >= ACCEPTANCE - 1.5 / len(scores)


def test_the_stored_rule_flags_photographs_and_accepts_unseen_images(run) -> None:
    threshold = checkpoint.read_card(run["ckpt"]).unknown_threshold
    unseen, _ = _served_scores(run["ckpt"], run["test"])
    photos, _ = _served_scores(run["ckpt"], run["other"])
    assert float(np.mean(unseen > threshold)) <= 0.10
    assert float(np.mean(photos > threshold)) >= 0.80


def test_the_weights_file_holds_the_stage_state_and_no_class_means(run) -> None:
    from safetensors.torch import load_file

    state = load_file(str(run["ckpt"] / "model.safetensors"))
    widths = (64, 128, 256, 512)
    for s, width in enumerate(widths):
        assert state[stage_key(s, "means")].shape == (3, width)
        assert state[stage_key(s, "whitening")].shape == (width, width)
    assert state[STANDARDISE_KEY].shape == (4, 2) and CLASS_MEANS_KEY not in state


def test_evaluate_reports_accepted_rejected_and_auroc(run) -> None:
    report = evaluate_checkpoint(EvaluateConfig(checkpoint=run["ckpt"], data=run["val"],
                                                unknown=run["other"]))["unknown"]
    card = checkpoint.read_card(run["ckpt"])
    known, _ = _served_scores(run["ckpt"], run["val"])
    other, _ = _served_scores(run["ckpt"], run["other"])
    assert report["threshold"] == card.unknown_threshold
    assert report["other_images"] == len(other) == 20
    assert report["accepted"] == pytest.approx(np.mean(known <= card.unknown_threshold))
    assert report["rejected"] == pytest.approx(np.mean(other > card.unknown_threshold))
    assert 0.0 <= report["auroc"] <= 1.0
    pairs = np.mean(other[None, :] > known[:, None]) + 0.5 * np.mean(
        other[None, :] == known[:, None])
    assert report["auroc"] == pytest.approx(pairs)


@pytest.mark.asyncio(loop_scope="session")
async def test_predict_flags_exactly_what_evaluate_rejects(run, tmp_path: Path) -> None:
    scores, paths = _served_scores(run["ckpt"], run["other"])
    known_scores, known_paths = _served_scores(run["ckpt"], run["val"])
    scores, paths = np.concatenate([scores, known_scores[:6]]), paths + known_paths[:6]
    # the fitted rule as trained, and the same rule cut at these images' median score so
    # that both verdicts occur whatever the tiny model learnt
    median = float(np.median(scores))
    root = tmp_path / "served"
    root.mkdir()
    copy_checkpoint(run["ckpt"], root / "fitted")
    copy_checkpoint(run["ckpt"], root / "median", card_text=lambda c: json.dumps(
        {**c, "unknown": {**c["unknown"], "threshold": median}}))
    copy_checkpoint(run["ckpt"], root / "old", card_text=lambda c: json.dumps(
        {k: v for k, v in c.items() if k != "unknown"}))
    fitted = checkpoint.read_card(run["ckpt"]).unknown_threshold
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    settings = fast_settings(root, default_model="fitted", max_images_per_request=32)
    async with running_app(settings) as (client, _):
        answers = {(model, strict): await client.post(
                       "/predict", files=files,
                       params={"model": model, "reject_unknown": str(strict).lower()})
                   for model in ("fitted", "median") for strict in (False, True)}
        old = await client.post("/predict", params={"model": "old"}, files=files[:1])
        refused = await client.post("/predict", params={"model": "old",
                                                        "reject_unknown": "true"},
                                    files=files[:1])
    assert {key: a.status_code for key, a in answers.items()} == dict.fromkeys(answers, 200)
    for model, cut in (("fitted", fitted), ("median", median)):
        plain = answers[model, False].json()["results"]
        strict = answers[model, True].json()["results"]
        assert [r["unknown"] for r in plain] == (scores > cut).tolist()
        np.testing.assert_allclose([r["unknown_score"] for r in plain], scores, atol=1e-4)
        for p, s in zip(plain, strict, strict=True):
            assert p["predictions"]
            assert s["predictions"] == ([] if p["unknown"] else p["predictions"])
    flags = [r["unknown"] for r in answers["median", False].json()["results"]]
    assert any(flags) and not all(flags)
    assert old.status_code == 200 and "unknown" not in old.json()["results"][0]
    assert refused.status_code == 422 and "unknown-input threshold" in refused.json()["detail"]


def test_the_rules_state_missing_or_malformed_is_refused_at_load(run, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(run["ckpt"] / "model.safetensors"))
    unsigned = lambda c: json.dumps({k: v for k, v in c.items() if k != "weights_sha256"})  # noqa: E731
    means, white = stage_key(2, "means"), stage_key(3, "whitening")
    cases = {"missing": ({white: None}, f"holds no {white}"),
             "shape": ({means: torch.ones(2, 256)}, f"{means} must be finite floats of shape"),
             "nan": ({white: torch.full((512, 512), float("nan"))}, f"{white} must be finite"),
             "scale": ({STANDARDISE_KEY: torch.zeros(4, 2)}, "positive scales"),
             "cosine": ({CLASS_MEANS_KEY: torch.ones(3, 512)}, "does not use")}
    for name, (edits, message) in cases.items():
        target = tmp_path / name
        copy_checkpoint(run["ckpt"], target, card_text=unsigned)
        changed = dict(state)
        for key, value in edits.items():
            changed.pop(key, None)
            if value is not None:
                changed[key] = value
        save_file(changed, str(target / "model.safetensors"))
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load(target)


def _cosine_checkpoint(run: dict[str, Path], target: Path) -> torch.Tensor:
    """The fitted checkpoint as one written before the stage score: the cosine rule with the
    class means of its training images in the weights file; returns the means."""
    from safetensors.torch import load_file, save_file

    model, card = checkpoint.load(run["ckpt"])
    found = discover(run["train"], task="single_label", classes=card.classes)
    dataset = ImageDataset(found.samples, card.classes, "single_label",
                           eval_transform(card.preprocessing))
    images, labels, _ = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    with torch.no_grad():
        _, features = WithFeatures(model, "fc")(Normalize(card.preprocessing)(
            torch.stack(images)))
    means = class_means(features, torch.stack(labels), card.num_classes)
    weights = {k: v for k, v in load_file(str(run["ckpt"] / "model.safetensors")).items()
               if not k.startswith("unknown.")}
    copy_checkpoint(run["ckpt"], target, card_text=lambda c: json.dumps(
        {**{k: v for k, v in c.items() if k != "weights_sha256"},
         "unknown": {"method": COSINE, "threshold": 0.05, "acceptance": 0.95}}))
    save_file({**weights, CLASS_MEANS_KEY: means}, str(target / "model.safetensors"))
    return means


def test_checkpoints_with_the_cosine_rule_still_load_and_serve(run, tmp_path: Path) -> None:
    means = _cosine_checkpoint(run, tmp_path / "old")
    model, card = checkpoint.load(tmp_path / "old")
    predictor = Predictor(model, card, Accelerator.create("cpu", "fp32"))
    scores, paths = _served_scores(tmp_path / "old", run["other"])
    transform, normalize = eval_transform(card.preprocessing), Normalize(card.preprocessing)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        _, features = WithFeatures(model, "fc")(normalize(images))
    np.testing.assert_allclose(scores, cosine_distance(features, means).numpy(), atol=1e-4)
    results = predictor.answer(predictor.outputs(images), reject_unknown=True)
    assert [r.unknown for r in results] == (scores > 0.05).tolist()
    assert all(r.predictions == [] for r in results if r.unknown)


def test_torch_and_onnx_runtime_give_the_same_scores(run) -> None:
    pytest.importorskip("onnxruntime")
    model, card = checkpoint.load(run["ckpt"])
    batch = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    cpu = Accelerator.create("cpu", "fp32")
    torch_out = Predictor(model, card, cpu).outputs(batch)
    onnx_out = Predictor(model, card, cpu, backend="onnxruntime", threads=1).outputs(batch)
    assert torch_out.shape == (6, 4)
    torch.testing.assert_close(onnx_out, torch_out, atol=1e-3, rtol=1e-4)


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory: pytest.TempPathFactory, multi_data: Path) -> Path:
    """A one-epoch multi-label run (four shapes, a CSV), its rule at 90% acceptance."""
    from training.distributed import DistInfo
    from training.fit import FitRun

    out = tmp_path_factory.mktemp("unknown-multi") / "ckpt"
    FitRun(tiny_config(multi_data, out, epochs=1, unknown_acceptance=0.9), DistInfo()).run()
    return out


def test_a_multi_label_fit_stores_the_rule_and_both_backends_serve_it(multi_run) -> None:
    pytest.importorskip("onnxruntime")
    model, card = checkpoint.load(multi_run)
    assert card.task == "multi_label" and card.unknown["method"] == METHOD
    # the threshold accepts the fewest validation images that make at least 90%: on a handful
    # of images that is up to one image more than 90% of them
    accepted, images = card.unknown["val_accepted"], card.unknown["val_images"]
    assert card.unknown["acceptance"] == 0.9 and 0.9 <= accepted < 0.9 + 1 / images
    assert card.unknown["expected_flagged"]["acceptance"] == 0.9
    batch = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    cpu = Accelerator.create("cpu", "fp32")
    torch_run = Predictor(model, card, cpu)
    outputs = torch_run.outputs(batch)
    onnx_out = Predictor(model, card, cpu, backend="onnxruntime", threads=1).outputs(batch)
    torch.testing.assert_close(onnx_out, outputs, atol=1e-3, rtol=1e-4)
    flags = [r.unknown for r in torch_run.answer(outputs)]
    assert flags == (outputs[:, -1] > card.unknown_threshold).tolist()


def test_evaluate_unknown_needs_a_card_with_the_rule(run, tmp_path: Path) -> None:
    from training.exceptions import DataError

    copy_checkpoint(run["ckpt"], tmp_path / "old", card_text=lambda c: json.dumps(
        {k: v for k, v in c.items() if k != "unknown"}))
    report = evaluate_checkpoint(EvaluateConfig(checkpoint=tmp_path / "old", data=run["val"]))
    assert "unknown" not in report and report["accuracy"] >= 0.0
    with pytest.raises(DataError, match="no unknown-input rule"):
        evaluate_checkpoint(EvaluateConfig(checkpoint=tmp_path / "old", data=run["val"],
                                           unknown=run["other"]))


@pytest.mark.asyncio(loop_scope="session")
async def test_the_inference_protocol_answers_the_same_unknown_score(run, tmp_path: Path) -> None:
    import base64

    root = tmp_path / "served"
    root.mkdir()
    copy_checkpoint(run["ckpt"], root / "fitted")
    paths = sorted(run["other"].glob("*.png"))[:3]
    card = checkpoint.read_card(run["ckpt"])
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(paths)],
                        "data": [base64.b64encode(p.read_bytes()).decode() for p in paths]}]}
    async with running_app(fast_settings(root)) as (client, _):
        meta = (await client.get("/v2/models/fitted")).json()
        answer = await client.post("/v2/models/fitted/infer", json=body)
        asked = await client.post("/v2/models/fitted/infer", json={
            **body, "outputs": [{"name": "UNKNOWN_SCORE"}]})
        refused = await client.post("/v2/models/fitted/infer", json={
            **body, "outputs": [{"name": "UNKNOWN_SCORE", "parameters": {"classification": 1}}]})
        served = await client.post("/predict", files=[
            ("file", (p.name, p.read_bytes(), "image/png")) for p in paths])
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["UNKNOWN_SCORE"]["parameters"]["threshold"] == card.unknown_threshold
    assert answer.status_code == 200, answer.text
    by_name = {o["name"]: o["data"] for o in answer.json()["outputs"]}
    expected = [r["unknown_score"] for r in served.json()["results"]]
    np.testing.assert_allclose(by_name["UNKNOWN_SCORE"], expected, atol=1e-6)
    assert [o["name"] for o in asked.json()["outputs"]] == ["UNKNOWN_SCORE"]
    assert refused.status_code == 400 and "PROBABILITIES only" in refused.json()["error"]


@pytest.mark.parametrize("value", ["0.3", "1.5", "nan"])
def test_an_acceptance_outside_half_to_one_is_a_one_line_error(value: str, tmp_path: Path,
                                                               caplog) -> None:
    import logging

    from training.cli import main

    out = tmp_path / "out"
    code = main(["fit", str(tmp_path), "--output", str(out), "--weights", "none",
                 "--unknown-acceptance", value])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 1 and not out.exists() and len(errors) == 1
    assert "--unknown-acceptance must be a finite number in [0.5, 1]" in errors[0]
