"""`fit` stores what its validation images looked like to the model (the card's `drift`
field) as the server scores them: the same top-1 confidences, unknown scores and classes
that /predict answers for those images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import checkpoint
from models.drift import CONFIDENCE_EDGES, UNKNOWN_EDGES, histogram
from tests.cards import copy_checkpoint
from tests.serving_helpers import fast_settings, running_app


@pytest.mark.asyncio(loop_scope="session")
async def test_fit_stores_the_reference_the_server_answers_for_validation(
        trained, tmp_path: Path) -> None:
    run, out = trained
    card = checkpoint.read_card(out)
    drift = card.drift
    assert drift is not None, "fit wrote no drift reference"
    paths = [sample.path for sample in run.data.val.samples]
    assert drift["images"] == len(paths) > 0
    assert drift["confidence"]["edges"] == list(CONFIDENCE_EDGES)
    assert card.unknown is not None and drift["unknown_score"]["edges"] == list(UNKNOWN_EDGES)

    root = tmp_path / "served"
    root.mkdir()
    copy_checkpoint(out, root / "tiny")
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    async with running_app(fast_settings(root, max_images_per_request=len(files))) as (
            client, _):
        answer = await client.post("/predict", files=files, params={"top_k": 1})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    top = [r["predictions"][0] for r in results]
    unknown = np.array([r["unknown_score"] for r in results])
    assert drift["confidence"]["counts"] == histogram(np.array([p["score"] for p in top]),
                                                      CONFIDENCE_EDGES)
    assert drift["unknown_score"]["counts"] == histogram(unknown, UNKNOWN_EDGES)
    predicted = [card.classes.index(p["label"]) for p in top]
    assert drift["predicted_class"] == np.bincount(predicted,
                                                   minlength=card.num_classes).tolist()
    assert drift["unknown_rate"] == pytest.approx(np.mean(unknown > card.unknown_threshold))
