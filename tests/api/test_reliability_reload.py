"""Reload without loss: swaps under load fail nothing, and retired models are freed."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref

import pytest

from tests.serving_helpers import CLASSES, fast_settings, inside, jpeg, running_app, slow_down

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]  # 20 s of reloads


def bump(card_path, round_: int) -> None:
    """Write a new version of a card (the registry sees a changed checkpoint)."""
    card = json.loads(card_path.read_text())
    card["metrics"] = {"round": round_}
    card_path.write_text(json.dumps(card))


async def test_reloads_under_multi_image_load_lose_nothing(make_checkpoint_dir) -> None:
    gc.disable()  # prove that retired versions do not wait for the cycle collector
    try:
        await _reloads_under_load(make_checkpoint_dir)
    finally:
        gc.enable()


async def _reloads_under_load(make_checkpoint_dir) -> None:
    root = make_checkpoint_dir("colors")
    settings = fast_settings(root, max_batch_size=4, max_queue=64)
    async with running_app(settings) as (http, app):
        slow_down(app, "colors", 0.02)
        retired: list[weakref.ref] = []
        done = asyncio.Event()
        statuses: list[int] = []

        async def client(i: int) -> None:
            j = 0
            while not done.is_set() or j < 3:
                colours = [CLASSES[(i + j + k) % 3] for k in range(3)]  # spans batches of 4
                files = [("file", (f"{k}.jpg", jpeg(c, seed=j))) for k, c in enumerate(colours)]
                r = await http.post("/predict", files=files, params={"top_k": 1})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    got = [x["predictions"][0]["label"] for x in r.json()["results"]]
                    assert got == colours
                j += 1

        async def reloads(rounds: int) -> None:
            for k in range(rounds):
                await asyncio.sleep(0.05)
                retired.append(weakref.ref(inside(app).model("colors")))
                bump(root / "colors" / "card.json", k)
                r = await http.post("/models/reload")
                assert r.json()["loaded"] == ["colors"], r.json()
            done.set()

        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(6)), reloads(8)), 120)
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        assert (await http.get("/models/colors")).json()["card"]["metrics"] == {"round": 7}
        # freed at once, by reference counting: no reference cycle keeps old weights alive
        alive = [ref for ref in retired if ref() is not None]
        assert not alive, f"{len(alive)} retired model versions are still in memory"
        gc.collect()
        assert all(ref() is None for ref in retired)
