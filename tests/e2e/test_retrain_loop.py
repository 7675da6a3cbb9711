"""The loop after deployment against the real server process: feedback sent to /feedback,
`fit --weights` on the folder it fills, the new checkpoint written into the served folder,
picked up by a reload and listed with its parent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from tests.server_process import serving
from tests.serving_helpers import CLASSES, jpeg
from training.cli import main

pytestmark = pytest.mark.slow


def test_feedback_retrain_reload(tmp_path: Path, make_checkpoint_dir) -> None:
    served, feedback = make_checkpoint_dir("colors"), tmp_path / "feedback"
    digest = hashlib.sha256((served / "colors" / "model.safetensors").read_bytes()).hexdigest()
    flags = ("--feedback-dir", str(feedback), "--default-model", "colors", "--torch-threads",
             "1", "--decode-workers", "1")
    with serving(served, tmp_path / "server.log", *flags) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        for seed in range(15):
            label = CLASSES[seed % 3]
            sent = http.post("/feedback", data={"label": label}, files={
                "file": (f"{seed}.jpg", jpeg(label, seed=200 + seed), "image/jpeg")})
            assert sent.status_code == 200, sent.text
        code = main(["fit", str(feedback / "colors" / "data"), "--weights",
                     str(served / "colors"), "--output", str(served / "colors-v2"),
                     "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress"])
        assert code == 0
        reload = http.post("/models/reload").json()
        models = {m["name"]: m for m in http.get("/models").json()["models"]}
        answer = http.post("/predict", params={"model": "colors-v2"}, files={
            "file": ("red.jpg", jpeg("red", seed=999), "image/jpeg")})
    assert reload["loaded"] == ["colors-v2"] and reload["failed"] == {}
    assert models["colors-v2"]["status"] == "loaded"
    assert models["colors-v2"]["card"]["parent"] == {"name": "colors", "weights_sha256": digest}
    assert models["colors"]["card"]["parent"] is None
    assert answer.status_code == 200 and answer.json()["model"] == "colors-v2"
