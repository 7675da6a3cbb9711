"""The server applies a card's temperature exactly as `evaluate` does; a card without one
serves plain softmax, as before calibration existed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import checkpoint
from models.device import Accelerator
from models.predict import Predictor
from tests.cards import copy_checkpoint
from tests.serving_helpers import fast_settings, running_app
from training.commands.evaluate import build_eval_dataset, score_dataset

pytestmark = pytest.mark.asyncio(loop_scope="session")
TEMPERATURE = 3.0


def _with_temperature(card: dict) -> str:
    card["calibration"] = {**card["calibration"], "temperature": TEMPERATURE}
    return json.dumps(card)


def _without_calibration(card: dict) -> str:
    return json.dumps({k: v for k, v in card.items() if k != "calibration"})


def _evaluate_scores(directory: Path, data: Path) -> tuple[np.ndarray, list[Path]]:
    """What `training evaluate` scores every image of `data` with, through the checkpoint."""
    model, card = checkpoint.load(directory)
    predictor = Predictor(model, card, Accelerator.create("cpu", "fp32"))
    dataset = build_eval_dataset(data, card)
    outputs, _, failed = score_dataset(predictor, dataset, batch_size=8, workers=0)
    assert not failed
    return predictor.scores(torch.as_tensor(outputs)).numpy(), [s.path for s in dataset.samples]


async def test_served_scores_are_calibrated_like_evaluate(trained, single_data: Path,
                                                          tmp_path: Path) -> None:
    _, out = trained
    root = tmp_path / "served"
    root.mkdir()
    copy_checkpoint(out, root / "calibrated", card_text=_with_temperature)
    copy_checkpoint(out, root / "plain", card_text=_without_calibration)
    evaluated = {name: _evaluate_scores(root / name, single_data)
                 for name in ("calibrated", "plain")}
    paths = evaluated["plain"][1]
    picks = [0, len(paths) // 2, len(paths) - 1]
    served: dict[str, list[list[float]]] = {"calibrated": [], "plain": []}
    async with running_app(fast_settings(root, default_model="plain")) as (client, _):
        for name in served:
            for i in picks:
                response = await client.post(
                    "/predict", params={"model": name, "all_scores": "true"},
                    files={"file": (paths[i].name, paths[i].read_bytes(), "image/png")})
                assert response.status_code == 200, response.text
                scores = response.json()["results"][0]["scores"]
                served[name].append([scores[c] for c in checkpoint.read_card(out).classes])
    for name, (scores, _) in evaluated.items():
        np.testing.assert_allclose(np.array(served[name]), scores[picks], atol=1e-5)
    # softmax(z / T) is softmax(log softmax(z) / T): the plain scores, rescaled by hand
    plain = evaluated["plain"][0][picks].astype(np.float64)
    rescaled = np.exp(np.log(plain) / TEMPERATURE)
    rescaled /= rescaled.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(served["calibrated"]), rescaled, atol=1e-5)
    assert not np.allclose(served["calibrated"], served["plain"], atol=1e-3)
