"""Helpers for the serving tests: coloured test images, fast settings, an in-process app."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 210)}
CLASSES = list(COLORS)
CROP = 32
MULTI_THRESHOLDS = [0.5, 0.3, 0.7]


def color_image(name: str, *, seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A noisy, mostly-`name`-coloured RGB image."""
    rng = np.random.default_rng(seed)
    base = np.array(COLORS[name], dtype=np.int16)
    noise = rng.integers(-40, 40, (size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    """Image -> file bytes in `fmt`."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(name: str, seed: int = 0, **kw: object) -> bytes:
    """JPEG bytes of a `name`-coloured image."""
    return encode(color_image(name, seed=seed, **kw), "JPEG", quality=92)


def png(name: str, seed: int = 0, **kw: object) -> bytes:
    """PNG bytes of a `name`-coloured image."""
    return encode(color_image(name, seed=seed, **kw), "PNG")


def fast_settings(checkpoint_dir: Path, **overrides: object):
    """Settings tuned for fast tests (small batches, CPU, no signal handlers)."""
    from app.config import Settings

    values: dict[str, object] = dict(
        checkpoint_dir=checkpoint_dir, device="cpu", max_batch_size=8, max_wait_ms=20,
        max_queue=64, max_images_per_request=16, request_timeout=20, decode_workers=2,
        reload_on_sighup=False, shutdown_timeout=10, torch_threads=1)
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_app(settings, *, wait_ready: bool = True
                      ) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The app with its lifespan running and an in-process client bound to it."""
    from app.main import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=60) as client:
            if wait_ready:
                await wait_until_ready(client)
                await wait_until_loaded(app)
            yield client, app


async def wait_until_ready(client: httpx.AsyncClient, timeout: float = 60.0,
                           headers: dict[str, str] | None = None) -> None:
    """Poll /ready until 200 (fails after `timeout` seconds)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        response = await client.get("/ready", headers=headers)
        if response.status_code == 200:
            return
        if loop.time() > give_up:
            raise AssertionError(f"not ready after {timeout} s: {response.text}")
        await asyncio.sleep(0.05)


async def wait_until_loaded(app, timeout: float = 60.0) -> None:
    """Wait until the registry has reached every checkpoint its scan found (none loading)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while app.state.registry.loading_names():
        if loop.time() > give_up:
            raise AssertionError(f"still loading after {timeout} s: "
                                 f"{app.state.registry.loading_names()}")
        await asyncio.sleep(0.05)


def slow_down(app, name: str, seconds: float) -> None:
    """Make a model's batches take at least `seconds` (the real model still runs)."""
    batcher = app.state.registry.get(name).batcher
    real = batcher.fn

    def slow(items):
        time.sleep(seconds)
        return real(items)

    batcher.fn = slow


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$" if labels \
        else rf"^{re.escape(name)} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0
