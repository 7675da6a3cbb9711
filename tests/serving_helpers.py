"""Helpers for the serving tests: coloured test images, fast settings, an in-process app,
and `inside(app)`, the one way a test reaches past the app's HTTP surface."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
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
    registry = inside(app).registry
    while registry.loading_names():
        if loop.time() > give_up:
            raise AssertionError(f"still loading after {timeout} s: "
                                 f"{registry.loading_names()}")
        await asyncio.sleep(0.05)


BatchWrap = Callable[[list, Callable[[list], object]], object]  # (items, real batch fn)


class Inside:
    """The one test hook: what a test may see or change past the app's HTTP surface.

    The registry the lifespan made (its public methods: `get`, `entries`, `loaded_names`,
    `loading_names`, `ready`, `begin_shutdown`), a served model by name, a model's batch
    function wrapped to spy, slow down or inject a fault, and the feedback service. Only this
    class knows where the app keeps them, so moving the serving core changes this class, not
    the tests (`tests/unit/test_test_hook.py` holds them to it).
    """

    def __init__(self, app) -> None:
        self._app = app

    @property
    def registry(self):
        """The app's ModelRegistry (None until its lifespan has started)."""
        return getattr(self._app.state, "registry", None)

    @property
    def feedback(self):
        """The app's feedback service: the store /feedback writes into, the review sampler."""
        return self._app.state.feedback

    def model(self, name: str | None = None):
        """The ServedModel now serving `name` (the default model without one)."""
        return self.registry.get(name)

    def batcher(self, name: str, *, explain: bool = False):
        """The DynamicBatcher of `name`'s /predict batches (of its /explain ones with
        `explain`)."""
        served = self.model(name)
        return served.explaining.batcher if explain else served.batcher

    def reserved(self, name: str) -> int:
        """Images that hold room in `name`'s queue while they decode (not queued yet)."""
        return self.batcher(name)._incoming

    def wrap_batches(self, name: str, wrap: BatchWrap, *, explain: bool = False) -> None:
        """Run each of `name`'s batches as `wrap(items, real)`, `real` being the batch function
        it had, for as long as this model version serves."""
        batcher = self.batcher(name, explain=explain)
        real = batcher.fn
        batcher.fn = lambda items: wrap(items, real)

    @contextlib.contextmanager
    def batches_through(self, name: str, wrap: BatchWrap, *,
                        explain: bool = False) -> Iterator[None]:
        """`wrap_batches` for the block; the batch function it found is back after it."""
        batcher = self.batcher(name, explain=explain)
        real = batcher.fn
        self.wrap_batches(name, wrap, explain=explain)
        try:
            yield
        finally:
            batcher.fn = real


def inside(app) -> Inside:
    """The test hook of an app made by `create_app` (see `Inside`)."""
    return Inside(app)


def slow_down(app, name: str, seconds: float) -> None:
    """Make a model's batches take at least `seconds` (the real model still runs)."""

    def slow(items: list, real: Callable[[list], object]) -> object:
        time.sleep(seconds)
        return real(items)

    inside(app).wrap_batches(name, slow)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$" if labels \
        else rf"^{re.escape(name)} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0
