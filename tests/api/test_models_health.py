"""GET /models, /models/{name}, /health, /ready, /metrics, /docs; broken checkpoints; auth."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import (
    CLASSES,
    fast_settings,
    inside,
    jpeg,
    running_app,
    wait_until_ready,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_models_lists_cards_without_weights(client: httpx.AsyncClient) -> None:
    r = await client.get("/models")
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "colors"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"colors", "tags"}
    colors = by_name["colors"]
    assert colors["status"] == "loaded" and colors["error"] is None
    assert colors["card"]["classes"] == CLASSES
    assert colors["card"]["preprocessing"]["crop"] == 32
    assert by_name["tags"]["card"]["task"] == "multi_label"
    # the card names its weights' digest, and holds none of their tensors
    assert "state_dict" not in r.text and "fc.weight" not in r.text and "conv1" not in r.text
    assert len(colors["card"]["weights_sha256"]) == 64 and len(r.text) < 10_000
    one = await client.get("/models/tags")
    assert one.status_code == 200 and one.json()["card"]["thresholds"] == [0.5, 0.3, 0.7]


async def test_health_ready_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["models"] == ["colors", "tags"]
    schema = (await client.get("/openapi.json")).json()
    assert {"/predict", "/models", "/models/{name}", "/models/reload", "/health", "/ready",
            "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/jpeg" in body
    assert (await client.get("/docs")).status_code == 200


async def test_metrics_text(client: httpx.AsyncClient) -> None:
    await client.post("/predict", files={"file": ("a.jpg", jpeg("red"))})
    text = (await client.get("/metrics")).text
    for name in ("resnet_serve_requests_total", "resnet_serve_request_duration_seconds_bucket",
                 "resnet_serve_batch_size_bucket", "resnet_serve_queue_depth",
                 "resnet_serve_images_dropped_total", "resnet_serve_overloaded_responses_total"):
        assert name in text, name
    assert 'route="/predict"' in text and 'status="200"' in text
    assert 'resnet_serve_queue_depth{model="colors"} 0.0' in text


async def test_broken_checkpoint_beside_a_good_one(make_checkpoint_dir, checkpoint_root: Path
                                                   ) -> None:
    card = json.loads((checkpoint_root / "colors" / "card.json").read_text())
    root = make_checkpoint_dir("colors", broken={
        "badjson": {"card.json": b"{not json", "model.safetensors": b"x"},
        "pickled": {"card.json": json.dumps({**card, "name": "pickled"}).encode(),
                    "model.pt": b"\x80\x04 pickle bytes that must never be loaded"},
        "garbage": {"card.json": json.dumps(card).encode(), "model.safetensors": b"junk"},
    })
    async with running_app(fast_settings(root)) as (http, _app):
        models = {m["name"]: m for m in (await http.get("/models")).json()["models"]}
        assert models["colors"]["status"] == "loaded"
        for name in ("badjson", "pickled", "garbage"):
            assert models[name]["status"] == "failed"
        assert "card.json" in models["badjson"]["error"]
        assert "pickle" in models["pickled"]["error"]
        assert models["pickled"]["card"]["name"] == "pickled"
        assert "model.safetensors" in models["garbage"]["error"]
        failed = await http.get("/models/garbage")
        assert failed.status_code == 200 and failed.json()["status"] == "failed"
        r = await http.post("/predict", files={"file": ("b.jpg", jpeg("blue"))})
        assert r.status_code == 200 and r.json()["model"] == "colors"
        r = await http.post("/predict", params={"model": "pickled"},
                            files={"file": ("b.jpg", jpeg("blue"))})
        assert r.status_code == 404


async def test_not_ready_without_models(tmp_path: Path) -> None:
    async with running_app(fast_settings(tmp_path), wait_ready=False) as (http, app):
        while inside(app).registry is None or \
                (await http.get("/models")).status_code != 200:
            await asyncio.sleep(0.01)
        assert (await http.get("/health")).status_code == 200
        r = await http.get("/ready")
        assert r.status_code == 503 and "Retry-After" in r.headers
        r = await http.post("/predict", files={"file": ("a.jpg", jpeg("red"))})
        assert r.status_code == 503
        assert (await http.get("/models")).json() == {"default": None, "models": []}


async def test_api_keys(checkpoint_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = fast_settings(checkpoint_root, default_model="colors",
                             api_keys=["s3cret-key", "other-key"])
    async with running_app(settings, wait_ready=False) as (http, _app):
        assert (await http.get("/health")).status_code == 200
        await wait_until_ready(http)
        files = {"file": ("a.jpg", jpeg("red"))}
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic s3cret-key"}):
            for method, path in (("POST", "/predict"), ("GET", "/models"),
                                 ("GET", "/models/colors"), ("POST", "/models/reload"),
                                 ("GET", "/metrics"), ("GET", "/openapi.json")):
                r = await http.request(method, path, headers=headers,
                                       files=files if path == "/predict" else None)
                assert r.status_code == 401, (method, path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
                assert "s3cret" not in r.text
        ok = await http.post("/predict", headers={"X-API-Key": "s3cret-key"}, files=files)
        assert ok.status_code == 200
        ok = await http.get("/models", headers={"Authorization": "Bearer other-key"})
        assert ok.status_code == 200
    assert "401" in caplog.text
    assert "s3cret" not in caplog.text and "other-key" not in caplog.text
