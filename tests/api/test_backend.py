"""The service on the ONNX Runtime backend answers as it does on PyTorch."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

from tests.serving_helpers import CLASSES, fast_settings, jpeg, running_app

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytestmark = [pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.slow]  # each ONNX load exports and checks the model


async def test_onnxruntime_backend_serves_the_same_answers(checkpoint_root: Path) -> None:
    answers: dict[str, list] = {}
    for backend in ("torch", "onnxruntime"):
        settings = fast_settings(checkpoint_root, default_model="colors", backend=backend)
        async with running_app(settings) as (http, _app):
            models = (await http.get("/models")).json()["models"]
            assert {m["name"]: m["backend"] for m in models} == {
                "colors": backend, "tags": backend}
            files = [("file", (f"{c}.jpg", jpeg(c, seed=4))) for c in CLASSES]
            single = (await http.post("/predict?top_k=3", files=files)).json()
            multi = (await http.post("/predict?model=tags&all_scores=true",
                                     files=files)).json()
            assert [r["predictions"][0]["label"] for r in single["results"]] == CLASSES
            answers[backend] = [single, multi]
    for torch_body, onnx_body in zip(answers["torch"], answers["onnxruntime"], strict=True):
        for t, o in zip(torch_body["results"], onnx_body["results"], strict=True):
            assert [p["label"] for p in t["predictions"]] == [p["label"] for p in o["predictions"]]
            for tp, op in zip(t["predictions"], o["predictions"], strict=True):
                assert abs(tp["score"] - op["score"]) < 1e-4
            for label, score in (t.get("scores") or {}).items():
                assert abs(score - o["scores"][label]) < 1e-4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names from /proc")
async def test_onnxruntime_worker_pool_is_named_for_compute(checkpoint_root: Path) -> None:
    def names() -> list[str]:
        found = []
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                found.append((task / "comm").read_text().strip())
        return found

    before = names()
    settings = fast_settings(checkpoint_root, default_model="colors", backend="onnxruntime",
                             torch_threads=2)
    async with running_app(settings) as (http, _app):
        r = await http.post("/predict", files={"file": ("a.jpg", jpeg("red", seed=1))})
        assert r.status_code == 200
        during = names()
    # ONNX Runtime's pool (one thread fewer than its intra-op count, per session) was started
    # on the loader thread and outlives it: it carries the compute name, and no thread is
    # left named for loading
    assert not [n for n in during if n.startswith("load")], during
    assert during.count("compute") - before.count("compute") >= 2, during
