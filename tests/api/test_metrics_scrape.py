"""A scrape with several workers reads files: off the event loop, never mid-rewrite."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from app.main import create_app
from app.metrics import MULTIPROC_ENV
from app.process.metrics_files import MERGE_LOCK, MetricsFolder
from app.process.shared_tables import ClusterTables
from app.process.worker_link import WorkerLink
from tests.serving_helpers import fast_settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_scrape_waits_for_an_archive_rewrite_and_the_loop_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = MetricsFolder.claim(tmp_path)
    archive = MmapedDict(str(folder.path / "counter_archive.db"))  # what dead workers counted
    archive.write_value(mmap_key("resnet_serve_requests", "resnet_serve_requests_total",
                                 ["route"], ["/predict"], "HTTP requests answered"), 5.0, 0.0)
    archive.close()
    monkeypatch.setenv(MULTIPROC_ENV, str(folder.path))
    link = WorkerLink(ClusterTables.create(1, multiprocessing.get_context("spawn")), 0)
    app = create_app(fast_settings(tmp_path), cluster=link)  # no lifespan: no models
    rewrite = os.open(folder.path / MERGE_LOCK, os.O_RDWR)
    fcntl.flock(rewrite, fcntl.LOCK_EX)  # the supervisor folding a dead worker's files
    # released by a timer too, so a scrape that blocks the loop fails instead of hanging
    timer = threading.Timer(3.0, os.close, (rewrite,))
    timer.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            scrape = asyncio.create_task(client.get("/metrics"))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            health = await client.get("/health")
            assert health.status_code == 200 and time.monotonic() - started < 1.0
            assert not scrape.done()  # it waits for the rewrite to finish
            timer.cancel()
            os.close(rewrite)
            answer = await asyncio.wait_for(scrape, 10)
        assert answer.status_code == 200
        assert 'resnet_serve_requests_total{route="/predict"} 5.0' in answer.text
    finally:
        timer.cancel()
        folder.remove()
