"""Reload without loss, a checkpoint breaking on reload, start-up order, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from models import checkpoint
from tests.serving_helpers import (
    CLASSES,
    fast_settings,
    inside,
    jpeg,
    running_app,
    slow_down,
    wait_until_loaded,
    wait_until_ready,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


def bump_card(path: Path, **changes: object) -> None:
    """Rewrite a checkpoint's card so the registry sees a new version."""
    card = json.loads((path / "card.json").read_text())
    card.update(changes)
    (path / "card.json").write_text(json.dumps(card))


async def test_reload_adds_swaps_and_removes(make_checkpoint_dir, checkpoint_root: Path
                                             ) -> None:
    root = make_checkpoint_dir("colors")
    async with running_app(fast_settings(root)) as (http, app):
        old = inside(app).model("colors")
        r = await http.post("/models/reload")
        assert r.json() == {"loaded": [], "unchanged": ["colors"], "removed": [], "failed": {}}
        shutil.copytree(checkpoint_root / "tags", root / "tags")
        bump_card(root / "colors", metrics={"accuracy": 0.99})
        r = await http.post("/models/reload")
        assert r.status_code == 200
        assert sorted(r.json()["loaded"]) == ["colors", "tags"]
        new = inside(app).model("colors")
        assert new is not old and not old.batcher.running and new.batcher.running
        model = (await http.get("/models/colors")).json()
        assert model["card"]["metrics"] == {"accuracy": 0.99}
        shutil.rmtree(root / "tags")
        r = await http.post("/models/reload")
        assert r.json()["removed"] == ["tags"]
        assert (await http.get("/models/tags")).status_code == 404


async def test_checkpoint_broken_on_reload_keeps_old_version(make_checkpoint_dir) -> None:
    root = make_checkpoint_dir("colors")
    async with running_app(fast_settings(root)) as (http, app):
        served = inside(app).model("colors")
        (root / "colors" / "model.safetensors").write_bytes(b"truncated")
        r = await http.post("/models/reload")
        assert "model.safetensors" in r.json()["failed"]["colors"]
        info = (await http.get("/models/colors")).json()
        assert info["status"] == "loaded" and "previous version serving" in info["error"]
        assert inside(app).model("colors") is served
        ok = await http.post("/predict", files={"file": ("g.jpg", jpeg("green"))})
        assert ok.status_code == 200
        assert ok.json()["results"][0]["predictions"][0]["label"] == "green"


async def test_every_model_runs_on_one_compute_thread_and_loaders_exit(
        make_checkpoint_dir) -> None:
    root = make_checkpoint_dir("colors", "tags")
    async with running_app(fast_settings(root, default_model="colors")) as (http, app):
        ran_on: dict[str, set[int]] = {"colors": set(), "tags": set(), "explain": set()}
        for name in ("colors", "tags"):
            predictor = inside(app).model(name).predictor
            forward = predictor.outputs

            def recording(batch, _forward=forward, _name=name):
                ran_on[_name].add(threading.get_ident())
                return _forward(batch)

            def explaining(items, real):
                ran_on["explain"].add(threading.get_ident())
                return real(items)

            predictor.outputs = recording
            inside(app).wrap_batches(name, explaining, explain=True)
        for name in ("colors", "tags", "colors"):
            for route in ("/predict", "/explain"):
                r = await http.post(f"{route}?model={name}",
                                    files={"file": ("x.jpg", jpeg("red"))})
                assert r.status_code == 200, r.text
        bump_card(root / "tags", metrics={"round": 1})
        assert (await http.post("/models/reload")).json()["loaded"] == ["tags"]
        threads = ran_on["colors"] | ran_on["tags"]
        assert len(threads) == 1 and ran_on["colors"] == ran_on["tags"] == ran_on["explain"]
        assert threading.get_ident() not in threads
        await poll(lambda: not [t for t in threading.enumerate()
                                if t.name.startswith("load-")],
                   "the load threads to exit", tries=100)


@pytest.mark.parametrize("backend", [  # each ONNX load exports and checks the model: slow
    "torch", pytest.param("onnxruntime", marks=pytest.mark.slow)])
async def test_reload_under_load_loses_nothing(make_checkpoint_dir, backend: str) -> None:
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    root = make_checkpoint_dir("colors")
    async with running_app(fast_settings(root, backend=backend)) as (http, app):
        slow_down(app, "colors", 0.05)

        async def client_loop(i: int) -> list[int]:
            statuses = []
            for j in range(6):
                colour = CLASSES[(i + j) % 3]
                r = await http.post("/predict", files={"file": ("x.jpg", jpeg(colour, seed=j))})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    assert r.json()["results"][0]["predictions"][0]["label"] == colour
            return statuses

        async def reloads() -> None:
            for k in range(3):
                await asyncio.sleep(0.1)
                bump_card(root / "colors", metrics={"round": k})
                r = await http.post("/models/reload")
                assert r.json()["loaded"] == ["colors"]

        *statuses, _ = await asyncio.gather(*(client_loop(i) for i in range(6)), reloads())
        assert all(s == 200 for per_client in statuses for s in per_client), statuses


async def test_graceful_shutdown_finishes_requests_in_flight(checkpoint_root: Path) -> None:
    app = create_app(fast_settings(checkpoint_root, default_model="colors", max_wait_ms=0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        await wait_until_ready(http)
        slow_down(app, "colors", 0.3)
        in_flight = [asyncio.create_task(http.post(
            "/predict", files={"file": (f"{i}.jpg", jpeg(CLASSES[i % 3], seed=i))}))
            for i in range(4)]
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
        await asyncio.sleep(0.05)
        assert (await http.get("/ready")).status_code == 503
        refused = await http.post("/predict", files={"file": ("late.jpg", jpeg("red"))})
        assert refused.status_code == 503
        results = await asyncio.gather(*in_flight)
        assert [r.status_code for r in results] == [200] * 4
        assert [r.json()["results"][0]["predictions"][0]["label"] for r in results] == \
            [CLASSES[i % 3] for i in range(4)]
        await asyncio.wait_for(stopping, 10)
        assert all(not e.served.batcher.running for e in inside(app).registry.entries())


@dataclass
class HeldLoad:
    """Loading one checkpoint folder waits for `release` (the real load runs after it)."""

    folder: str
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def hold_loading(monkeypatch: pytest.MonkeyPatch):
    """`hold_loading(folder)`: loading that folder waits until the returned hold is released."""
    held: dict[str, HeldLoad] = {}
    real_load = checkpoint.load

    def load(directory, **options):
        hold = held.get(Path(directory).name)
        if hold is not None:
            hold.entered.set()
            hold.release.wait(timeout=60)
        return real_load(directory, **options)

    monkeypatch.setattr(checkpoint, "load", load)
    yield lambda folder: held.setdefault(folder, HeldLoad(folder))
    for hold in held.values():
        hold.release.set()
    for thread in threading.enumerate():  # let released loads end before the next test
        if thread.name.startswith("load-"):
            thread.join(timeout=60)


async def poll(condition: Callable[[], bool], what: str, tries: int = 1200) -> None:
    """Wait (bounded) until `condition()` holds."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def batcher_workers() -> list[str]:
    """Names of the batcher worker tasks still running on this event loop."""
    return sorted(t.get_name() for t in asyncio.all_tasks()
                  if t.get_name().startswith("batcher-") and not t.done())


async def test_ready_once_the_first_model_is_warm_while_others_load(
        make_checkpoint_dir, hold_loading) -> None:
    root = make_checkpoint_dir("colors", "tags")
    held = hold_loading("tags")
    async with running_app(fast_settings(root), wait_ready=False) as (http, app):
        await wait_until_ready(http, timeout=30)
        assert held.entered.wait(timeout=30) and not held.release.is_set()
        assert (await http.get("/ready")).json()["models"] == ["colors"]
        models = {m["name"]: m["status"] for m in (await http.get("/models")).json()["models"]}
        assert models == {"colors": "loaded", "tags": "loading"}
        r = await http.post("/predict?model=colors", files={"file": ("r.jpg", jpeg("red"))})
        assert r.status_code == 200
        early = await http.post("/predict?model=tags", files={"file": ("r.jpg", jpeg("red"))})
        assert early.status_code == 503 and "still loading" in early.json()["detail"]
        unnamed = await http.post("/predict", files={"file": ("r.jpg", jpeg("red"))})
        assert unnamed.status_code == 503 and "no default yet" in unnamed.json()["detail"]
        held.release.set()
        await wait_until_loaded(app)
        assert (await http.get("/ready")).json()["models"] == ["colors", "tags"]
        r = await http.post("/predict?model=tags", files={"file": ("g.jpg", jpeg("green"))})
        assert r.status_code == 200


async def test_shutdown_during_the_first_load_stops_every_started_worker(
        make_checkpoint_dir, hold_loading) -> None:
    root = make_checkpoint_dir("colors", "tags")
    held = hold_loading("tags")  # colors loads and starts its worker; tags is still loading
    app = create_app(fast_settings(root))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        await poll(held.entered.is_set, "the second checkpoint to start loading")
        assert batcher_workers() == ["batcher-colors", "batcher-colors-explain"]
    finally:
        stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
        await asyncio.sleep(0.1)
        assert not stopping.done()  # waits for the load thread, which cannot be interrupted
        held.release.set()  # the held load finishes now; its model is dropped, never started
        await asyncio.wait_for(stopping, 30)
    assert batcher_workers() == []
    # the load thread hands its result over as its last act, so it may still be exiting
    await poll(lambda: not [t for t in threading.enumerate() if t.name.startswith("load-")],
               "the load thread to exit", tries=100)
    assert inside(app).registry.loaded_names() == ["colors"]  # tags: loaded, then dropped


async def test_sighup_during_the_first_load_then_shutdown_ends_cleanly(
        make_checkpoint_dir, hold_loading, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    root = make_checkpoint_dir("colors", "tags")
    held = hold_loading("tags")
    app = create_app(fast_settings(root, reload_on_sighup=True))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    try:
        await poll(held.entered.is_set, "the second checkpoint to start loading")
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGHUP)  # its rescan waits for the first load
        await poll(lambda: "SIGHUP: rescanning" in caplog.text, "the SIGHUP handler")
    finally:
        stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
        await asyncio.sleep(0.1)
        held.release.set()
        await asyncio.wait_for(stopping, 30)
    assert batcher_workers() == []
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "sighup-reload"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_max_models_leaves_the_checkpoints_past_it_not_loaded(
        make_checkpoint_dir) -> None:
    root = make_checkpoint_dir("colors", "tags")
    shutil.copytree(root / "colors", root / "colors-2")
    settings = fast_settings(root, max_models=2, default_model="tags")
    async with running_app(settings) as (http, _app):
        models = {m["name"]: m for m in (await http.get("/models")).json()["models"]}
        # the default model first, then names in order
        assert {n: m["status"] for n, m in models.items()} == {
            "colors": "loaded", "tags": "loaded", "colors-2": "failed"}
        assert "max_models is 2" in models["colors-2"]["error"]
        assert "--max-models" in models["colors-2"]["error"]
        assert models["colors-2"]["card"]["name"] == "colors"  # what it is, still shown
        for name in ("colors", "tags"):
            ok = await http.post("/predict", params={"model": name},
                                 files={"file": ("r.jpg", jpeg("red"))})
            assert ok.status_code == 200
        left_out = await http.post("/predict", params={"model": "colors-2"},
                                   files={"file": ("r.jpg", jpeg("red"))})
        assert left_out.status_code == 404
        shutil.rmtree(root / "colors")  # its place goes to the one left out
        report = (await http.post("/models/reload")).json()
        assert report["loaded"] == ["colors-2"] and report["removed"] == ["colors"]


def resident_mb() -> float:
    """This process's resident memory in MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE") / 1e6


async def test_a_removed_models_memory_is_given_back(make_checkpoint_dir) -> None:
    root = make_checkpoint_dir("colors")
    copies = [f"copy-{n}" for n in range(3)]
    for name in copies:
        shutil.copytree(root / "colors", root / name)
    async with running_app(fast_settings(root, default_model="colors")) as (http, app):
        predictors = [weakref.ref(inside(app).model(n).predictor) for n in copies]
        loaded = resident_mb()
        for name in copies:
            shutil.rmtree(root / name)
        report = (await http.post("/models/reload")).json()
        assert report["removed"] == copies
        # no gc.collect() here: the reload collects the retired models and trims the heap
        assert [ref() for ref in predictors] == [None] * len(copies)
        given_back = loaded - resident_mb()
        assert given_back > 30 * len(copies), f"{given_back:.0f} MB given back"  # ~45 each
