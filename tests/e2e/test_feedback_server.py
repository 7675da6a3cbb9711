"""POST /feedback on the real server process: labelled images land in a dataset folder that
`fit`'s discovery reads as it is, each image once, and a quota answers 507."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.server_process import serving
from tests.serving_helpers import CLASSES, jpeg
from training.data.discovery import discover

pytestmark = pytest.mark.slow


def test_feedback_makes_a_dataset_fit_reads(tmp_path: Path, checkpoint_root: Path) -> None:
    root = tmp_path / "feedback"
    with serving(checkpoint_root, tmp_path / "server.log", "--feedback-dir", str(root),
                 "--feedback-quota-bytes", "30000", "--default-model", "colors") as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        answers = []
        for seed in range(6):
            label = CLASSES[seed % 3]
            answers.append(http.post("/feedback", data={"label": label}, files={
                "file": (f"{seed}.jpg", jpeg(label, seed=seed), "image/jpeg")}))
        again = http.post("/feedback", data={"label": "red"},
                          files={"file": ("0.jpg", jpeg("red", seed=0), "image/jpeg")})
        statuses = []
        for seed in range(6, 40):  # until the quota is reached
            r = http.post("/feedback", data={"label": "blue"}, files={
                "file": (f"{seed}.jpg", jpeg("blue", seed=seed, size=(96, 96)),
                         "image/jpeg")})
            statuses.append(r.status_code)
            if r.status_code != 200:
                break
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert again.json()["status"] == "unchanged"
    assert statuses[-1] == 507 and set(statuses[:-1]) == {200}
    found = discover(root / "colors" / "data", task="single")
    assert sorted(found.classes) == sorted(CLASSES)
    assert len(found.samples) == 6 + len(statuses) - 1
    assert sum(p.stat().st_size for p in (root / "colors" / "data").rglob("*.jpg")) <= 30000
