"""GET /health and GET /ready (open to all, as probes are), GET /metrics (needs a key)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from app.api.auth import API_KEY_REQUIRED
from app.api.deps import MetricsDep, RegistryDep
from app.api.schemas import Health, Readiness, error_responses
from app.exceptions import NotReadyError, ShuttingDownError

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
@router.head("/health", response_model=Health, include_in_schema=False)
async def health() -> Health:
    """Liveness: the process answers (GET or HEAD, as load balancers probe)."""
    return Health()


@router.get("/ready", response_model=Readiness, responses=error_responses(503))
@router.head("/ready", response_model=Readiness, include_in_schema=False)
async def ready(request: Request, registry: RegistryDep) -> Readiness:
    """Readiness: 200 once a model is loaded and warmed up (in every worker process);
    503 before and while stopping."""
    if registry.closing:
        raise ShuttingDownError("shutting down")
    if not registry.ready:
        raise NotReadyError("no model is loaded and warmed up yet")
    cluster = request.app.state.cluster
    if cluster is not None and not cluster.all_ready():
        raise NotReadyError(f"{cluster.ready_count()} of {cluster.workers} worker processes "
                            "are ready")
    return Readiness(models=registry.loaded_names())


@router.get("/metrics", response_class=Response, dependencies=[API_KEY_REQUIRED], responses={
    200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
    **error_responses(401)})
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests, latency, batch sizes, queue depth, drops."""
    # off the event loop: with several workers a scrape reads every worker's files
    return Response(await asyncio.to_thread(metrics.render), media_type=metrics.content_type)
