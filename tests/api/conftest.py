"""An app over the shared `colors` + `tags` checkpoints, started once per module."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest_asyncio

from tests.serving_helpers import fast_settings, running_app


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(checkpoint_root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app serving `colors` (the default) and `tags`."""
    settings = fast_settings(checkpoint_root, default_model="colors")
    async with running_app(settings) as (http, _app):
        yield http
