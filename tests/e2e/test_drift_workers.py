"""Drift figures from the real server with `--workers 2`: each worker keeps its own window of
the images it answered, and a scrape (whichever worker answers it) shows one figure per
model and quantity, the largest over the workers, past the alert's threshold for texture
photographs shown to a digits model; counts and window sizes add up over the workers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.drift_window import MIN_WINDOW_IMAGES
from tests.api.test_drift_metrics import drift_alert_threshold
from tests.digits_model import train_digits_checkpoint, write_digits, write_textures
from tests.server_process import serving

pytestmark = pytest.mark.slow
REQUESTS, PER_REQUEST = 16, 30  # one worker answers at least half: past MIN_WINDOW_IMAGES


def test_two_workers_report_one_drift_figure_per_model_and_quantity(tmp_path: Path) -> None:
    assert REQUESTS * PER_REQUEST // 2 >= MIN_WINDOW_IMAGES
    served = tmp_path / "served"
    train_digits_checkpoint(write_digits(tmp_path / "data"), served / "digits", steps=40)
    textures = write_textures(tmp_path / "textures", REQUESTS * PER_REQUEST)
    flags = ("--workers", "2", "--torch-threads", "1", "--decode-workers", "1",
             "--max-images-per-request", str(PER_REQUEST), "--max-batch-size", "16")
    with serving(served, tmp_path / "server.log", *flags) as url:
        for start in range(0, len(textures), PER_REQUEST):  # a fresh connection each
            files = [("file", (p.name, p.read_bytes(), "image/png"))
                     for p in textures[start:start + PER_REQUEST]]
            answer = httpx.post(f"{url}/predict", files=files, timeout=60)
            assert answer.status_code == 200, answer.text
        scrapes = [httpx.get(f"{url}/metrics", timeout=10).text for _ in range(4)]
    for text in scrapes:
        samples = [s for family in text_string_to_metric_families(text)
                   for s in family.samples]
        figures = [s for s in samples if s.name == "resnet_serve_drift_psi"]
        assert sorted(s.labels["quantity"] for s in figures) == \
            ["confidence", "predicted_class", "unknown_score"]  # one each, no per-worker
        assert all(set(s.labels) == {"model", "quantity"} for s in figures)
        assert max(s.value for s in figures) > drift_alert_threshold()
        by_name = {s.name: s.value for s in samples if s.labels == {"model": "digits"}}
        assert by_name["resnet_serve_top1_confidence_count"] == len(textures)
        assert by_name["resnet_serve_drift_window_images"] == len(textures)
        classes = [s.value for s in samples if s.name == "resnet_serve_predicted_class_total"]
        assert sum(classes) == len(textures)
