"""POST /predict: shapes, multiple images, raw bodies, options, multi-label thresholds."""

from __future__ import annotations

import httpx
import pytest

from tests.serving_helpers import CLASSES, MULTI_THRESHOLDS, jpeg, png

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_single_jpeg_gets_its_colour(client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", files={"file": ("red.jpg", jpeg("red"), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "task", "results"}
    assert body["model"] == "colors" and body["task"] == "single_label"
    [result] = body["results"]
    # the fixture's card has no unknown-input rule: no verdict and no score
    assert set(result) == {"filename", "predictions"}
    assert result["filename"] == "red.jpg"
    assert [p["label"] for p in result["predictions"]][0] == "red"
    assert len(result["predictions"]) == 3  # top_k 5 clamped to 3 classes
    scores = [p["score"] for p in result["predictions"]]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
    assert r.headers["x-request-id"]


async def test_several_images_answer_in_upload_order(client: httpx.AsyncClient) -> None:
    order = ["blue", "red", "green", "green", "blue"]
    files = [("file", (f"{i}-{c}.{'png' if i % 2 else 'jpg'}",
                       png(c, seed=i) if i % 2 else jpeg(c, seed=i),
                       "image/png" if i % 2 else "image/jpeg"))
             for i, c in enumerate(order)]
    r = await client.post("/predict", files=files, params={"top_k": 1})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["filename"] for res in results] == [f[1][0] for f in files]
    assert [res["predictions"][0]["label"] for res in results] == order
    assert all(len(res["predictions"]) == 1 for res in results)


async def test_raw_body_upload(client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", content=png("green"), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert result["filename"] == "body"
    assert result["predictions"][0]["label"] == "green"


async def test_top_k_and_all_scores(client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", params={"top_k": 2, "all_scores": "true"},
                          files={"file": ("b.jpg", jpeg("blue"), "image/jpeg")})
    assert r.status_code == 200
    [result] = r.json()["results"]
    assert len(result["predictions"]) == 2
    assert set(result["scores"]) == set(CLASSES)
    assert result["predictions"][0]["score"] == pytest.approx(result["scores"]["blue"])


async def test_huge_top_k_is_clamped(client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", params={"top_k": 10_000},
                          files={"file": ("r.jpg", jpeg("red"), "image/jpeg")})
    assert r.status_code == 200
    assert len(r.json()["results"][0]["predictions"]) == len(CLASSES)


async def test_multi_label_uses_card_thresholds(client: httpx.AsyncClient) -> None:
    images = [("file", (f"{c}.jpg", jpeg(c, seed=3), "image/jpeg")) for c in CLASSES]
    r = await client.post("/predict", params={"model": "tags", "all_scores": "true"},
                          files=images)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "multi_label"
    for result in body["results"]:
        expected = {label for label, cut in zip(CLASSES, MULTI_THRESHOLDS, strict=True)
                    if result["scores"][label] >= cut}
        got = [p["label"] for p in result["predictions"]]
        assert set(got) == expected
        assert [p["score"] for p in result["predictions"]] == sorted(
            (result["scores"][g] for g in got), reverse=True)
    # the true colour of each image scores highest
    assert [max(res["scores"], key=res["scores"].get) for res in body["results"]] == CLASSES


async def test_multi_label_threshold_parameter(client: httpx.AsyncClient) -> None:
    files = {"file": ("g.jpg", jpeg("green"), "image/jpeg")}
    everything = await client.post("/predict", params={"model": "tags", "threshold": 0.0},
                                   files=files)
    assert {p["label"] for p in everything.json()["results"][0]["predictions"]} == set(CLASSES)
    r = await client.post("/predict", params={"model": "tags", "threshold": 0.5,
                                              "all_scores": True}, files=files)
    result = r.json()["results"][0]
    assert {p["label"] for p in result["predictions"]} == {
        k for k, v in result["scores"].items() if v >= 0.5}
    assert "scores" not in everything.json()["results"][0]


async def test_incoming_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    r = await client.get("/models", headers={"X-Request-ID": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    bad = await client.get("/models", headers={"X-Request-ID": "no spaces\tor tabs"})
    assert bad.headers["x-request-id"] != "no spaces\tor tabs"
    assert len(bad.headers["x-request-id"]) == 32
