"""Dependency aliases: what a router may ask for.

They are coroutines on purpose: FastAPI runs a plain `def` dependency on a worker thread,
which would cost every request thread hand-offs that compete with the model for the cores.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from app.config import Settings
from app.exceptions import NotReadyError
from app.metrics import Metrics
from app.serving.parser_pool import ParserPool
from app.serving.registry import ModelRegistry


async def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    """The app's metrics."""
    return request.app.state.metrics


async def get_registry(request: Request) -> ModelRegistry:
    """The app's model registry (503 before the lifespan has built it)."""
    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        raise NotReadyError("the service is starting")
    return registry


async def get_parsers(request: Request) -> ParserPool:
    """The processes that parse large request bodies (503 before the lifespan built them)."""
    parsers = getattr(request.app.state, "parsers", None)
    if parsers is None:
        raise NotReadyError("the service is starting")
    return parsers


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ParsersDep = Annotated[ParserPool, Depends(get_parsers)]
MODEL_NAME_MAX_LENGTH = 128  # ?model= longer than any checkpoint name is a mistake
# ?model= of the routes that run a model: which checkpoint (None: the default one)
ModelQuery = Annotated[str | None, Query(
    max_length=MODEL_NAME_MAX_LENGTH,
    description="model name (default: the configured or only model)", examples=["pets"])]
