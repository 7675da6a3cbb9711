"""Drift and quality series with real traffic: a digits model (tests.digits_model) shown its
own held-out digits keeps its drift figure under the alert's threshold, shown texture
photographs it moves past it; the histograms and class counts are those of the answers;
older cards still serve; and the dashboard and alert rules use only metrics /metrics has."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from models import checkpoint
from models.drift import CONFIDENCE_EDGES, UNKNOWN_EDGES, histogram
from models.drift_window import MIN_WINDOW_IMAGES
from tests.cards import copy_checkpoint
from tests.deploy.test_prometheus_rules import RULE_TESTS, RULES, dashboard_queries
from tests.digits_model import train_digits_checkpoint, write_digits, write_textures
from tests.serving_helpers import fast_settings, running_app

ON_SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")
pytestmark = pytest.mark.slow  # trains its digits model and sends it hundreds of images
PER_REQUEST = 50
METRIC_NAME = re.compile(r"\bresnet_serve_[a-z0-9_]+")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The digits checkpoint served under several names, its held-out scans, textures."""
    root = tmp_path_factory.mktemp("drift")
    folders = write_digits(root / "data")
    trained = train_digits_checkpoint(folders, root / "trained" / "digits")
    served = root / "served"
    served.mkdir()
    for name in ("holdout", "textures", "counts", "v2", "names"):
        copy_checkpoint(trained, served / name)
    copy_checkpoint(trained, served / "old", card_text=lambda c: json.dumps(
        {k: v for k, v in c.items() if k != "drift"}))
    return {"served": served, "card": checkpoint.read_card(trained),
            "holdout": sorted(folders["holdout"].rglob("*.png")),
            "textures": write_textures(root / "textures", 250)}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(digits: dict) -> AsyncIterator[httpx.AsyncClient]:
    settings = fast_settings(digits["served"], default_model="holdout",
                             max_images_per_request=PER_REQUEST, max_batch_size=32,
                             max_queue=256)
    async with running_app(settings) as (http, _app):
        yield http


async def predict(client: httpx.AsyncClient, model: str, paths: list[Path]) -> list[dict]:
    """/predict's results for `paths`, sent PER_REQUEST at a time."""
    results = []
    for start in range(0, len(paths), PER_REQUEST):
        files = [("file", (p.name, p.read_bytes(), "image/png"))
                 for p in paths[start:start + PER_REQUEST]]
        answer = await client.post("/predict", files=files, params={"model": model,
                                                                    "top_k": 1})
        assert answer.status_code == 200, answer.text
        results += answer.json()["results"]
    return results


async def scrape(client: httpx.AsyncClient) -> list:
    """Every sample /metrics exports now."""
    text = (await client.get("/metrics")).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def values(samples: list, name: str, **labels: str) -> dict[tuple, float]:
    """The samples called `name` whose labels include `labels`, by their other labels."""
    return {tuple(sorted((k, v) for k, v in s.labels.items() if k not in labels)): s.value
            for s in samples if s.name == name
            and all(s.labels.get(k) == v for k, v in labels.items())}


def psi_by_quantity(samples: list, model: str) -> dict[str, float]:
    return {dict(key)["quantity"]: value
            for key, value in values(samples, "resnet_serve_drift_psi", model=model).items()}


def drift_alert_threshold() -> float:
    """The PSI over which deploy/prometheus/alerts.yml raises ResnetServeModelDrift."""
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"]
             for rule in group["rules"] if rule.get("alert") == "ResnetServeModelDrift"]
    found = re.fullmatch(r"max by \(model\) \(resnet_serve_drift_psi\) > ([0-9.]+)",
                         rules[0]["expr"].strip())
    assert found, rules[0]["expr"]
    return float(found.group(1))


@ON_SESSION_LOOP
async def test_texture_photographs_move_drift_past_the_alert_and_held_out_digits_do_not(
        client: httpx.AsyncClient, digits: dict) -> None:
    threshold = drift_alert_threshold()
    holdout, textures = digits["holdout"], digits["textures"]
    assert len(holdout) > MIN_WINDOW_IMAGES and len(textures) > MIN_WINDOW_IMAGES
    await predict(client, "holdout", holdout[:150])
    await predict(client, "textures", textures[:150])
    early = await scrape(client)  # too few images yet for a figure worth reporting
    assert not psi_by_quantity(early, "holdout") and not psi_by_quantity(early, "textures")
    await predict(client, "holdout", holdout[150:])
    await predict(client, "textures", textures[150:])
    samples = await scrape(client)
    own, other = psi_by_quantity(samples, "holdout"), psi_by_quantity(samples, "textures")
    quantities = {"confidence", "unknown_score", "predicted_class"}
    assert set(own) == set(other) == quantities
    assert max(own.values()) < threshold, own
    assert max(other.values()) > threshold, other
    assert other["unknown_score"] > threshold, other
    windows = values(samples, "resnet_serve_drift_window_images")
    assert windows[(("model", "holdout"),)] == len(holdout)
    assert windows[(("model", "textures"),)] == len(textures)


@ON_SESSION_LOOP
async def test_histograms_and_class_counts_are_those_of_the_answers(
        client: httpx.AsyncClient, digits: dict) -> None:
    card = digits["card"]
    paths = digits["holdout"][:40] + digits["textures"][:20]
    results = await predict(client, "counts", paths)
    samples = await scrape(client)
    confidence = np.array([r["predictions"][0]["score"] for r in results])
    unknown = np.array([r["unknown_score"] for r in results])
    for name, edges, scores in (("resnet_serve_top1_confidence", CONFIDENCE_EDGES, confidence),
                                ("resnet_serve_unknown_score", UNKNOWN_EDGES, unknown)):
        buckets = values(samples, f"{name}_bucket", model="counts")
        cumulative = [buckets[(("le", str(float(edge))),)] for edge in edges[1:]]
        assert np.diff([0, *cumulative]).tolist() == histogram(scores, edges), name
        assert buckets[(("le", "+Inf"),)] == len(paths)
    classes = values(samples, "resnet_serve_predicted_class_total", model="counts")
    assert {dict(key)["class"] for key in classes} == set(card.classes)  # none other
    answered = [r["predictions"][0]["label"] for r in results]
    assert {dict(key)["class"]: n for key, n in classes.items() if n} == \
        {label: answered.count(label) for label in set(answered)}
    flagged = values(samples, "resnet_serve_unknown_images_total", model="counts")
    assert flagged[()] == sum(r["unknown"] for r in results) > 0


@ON_SESSION_LOOP
async def test_the_inference_protocol_is_counted_like_predict(
        client: httpx.AsyncClient, digits: dict) -> None:
    import base64

    paths = digits["holdout"][:3]
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(paths)],
                        "data": [base64.b64encode(p.read_bytes()).decode() for p in paths]}]}
    answer = await client.post("/v2/models/v2/infer", json=body)
    assert answer.status_code == 200, answer.text
    samples = await scrape(client)
    assert values(samples, "resnet_serve_top1_confidence_count", model="v2")[()] == 3
    assert values(samples, "resnet_serve_unknown_score_count", model="v2")[()] == 3


@ON_SESSION_LOOP
async def test_a_card_without_a_reference_serves_without_a_drift_figure(
        client: httpx.AsyncClient, digits: dict) -> None:
    results = await predict(client, "old", digits["holdout"][:MIN_WINDOW_IMAGES + 10])
    assert all(r["predictions"] for r in results)
    samples = await scrape(client)
    assert not psi_by_quantity(samples, "old")
    assert not values(samples, "resnet_serve_drift_window_images", model="old")
    assert values(samples, "resnet_serve_top1_confidence_count", model="old")[()] == \
        len(results)
    # the share of validation images its unknown threshold was set to leave out
    rate = values(samples, "resnet_serve_reference_unknown_rate", model="old")[()]
    assert rate == pytest.approx(1 - digits["card"].unknown["acceptance"])


@ON_SESSION_LOOP
async def test_the_dashboard_and_alert_rules_use_only_metrics_the_server_exports(
        client: httpx.AsyncClient, digits: dict) -> None:
    await predict(client, "names", digits["holdout"][:2])
    text = (await client.get("/metrics")).text
    exported = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    }.get(family.type, ("",))
        exported |= {family.name + suffix for suffix in suffixes}
    used = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    used_by_rules = set(METRIC_NAME.findall(RULES.read_text())) | \
        set(METRIC_NAME.findall(RULE_TESTS.read_text()))
    assert used and used_by_rules
    assert used - exported == set(), "the dashboard queries metrics /metrics lacks"
    assert used_by_rules - exported == set(), "the alert rules use metrics /metrics lacks"
