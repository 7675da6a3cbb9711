"""create_app: the one place where settings, registry, metrics and routers are wired."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI

from app.api import errors
from app.api.fast_path import FastPathMiddleware
from app.api.middleware import (
    ErrorBoundaryMiddleware,
    NoSniffMiddleware,
    RequestIdMiddleware,
    RequestMetricsMiddleware,
)
from app.api.routes import all_fast_paths, all_routers
from app.config import Settings
from app.exceptions import CheckpointFolderError, ShuttingDownError
from app.metrics import Metrics
from app.process.worker_link import WorkerLink
from app.serving.feedback import Feedback
from app.serving.imaging import ImageDecoder
from app.serving.parser_pool import ParserPool
from app.serving.registry import ModelRegistry, reload_logged
from models.backend_specs import backend_device
from models.device import Accelerator

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *,
               cluster: WorkerLink | None = None) -> FastAPI:
    """Build the FastAPI app; models load in its lifespan, never at import time.

    `cluster`: this process is one of several workers (app.process.supervisor) and shares
    readiness, reloads, queue room and metrics with the others through it.
    """
    settings = settings if settings is not None else Settings()
    metrics = Metrics(multiprocess_mode=cluster is not None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        accelerator = Accelerator.create(backend_device(settings.backend, settings.device),
                                         settings.precision)
        torch.set_num_threads(host_threads(settings.torch_threads, accelerator,
                                           processes=max(1, settings.workers)))
        decoder = ImageDecoder(workers=settings.decode_workers, max_pixels=settings.max_pixels,
                               limits=settings.decode_limits())
        registry = ModelRegistry(settings, accelerator=accelerator, decoder=decoder,
                                 metrics=metrics,
                                 queue_bounds=cluster.queue_bound if cluster else None)
        app.state.registry = registry
        app.state.parsers = parsers = ParserPool(settings.parse_processes)
        metrics.watch_workers(cluster.ready_count if cluster else lambda: int(registry.ready))
        logger.info("serving from %s on %s (%s)", settings.checkpoint_dir,
                    accelerator.describe(), accelerator.precision_name)
        loading = asyncio.create_task(_initial_load(registry), name="initial-load")
        rescans: set[asyncio.Task[None]] = set()  # held here so none is collected mid-run
        if cluster is not None:  # the supervisor relays SIGHUP through the shared tables
            rescans.add(asyncio.create_task(cluster.run(registry, metrics, loading),
                                            name="cluster-tick"))
        sighup = (settings.reload_on_sighup and cluster is None
                  and _install_sighup(registry, rescans))
        try:
            yield
        finally:
            registry.begin_shutdown()
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            for task in (loading, *rescans):
                task.cancel()
            # whatever they published by now is stopped by close(), none of it is left running
            await asyncio.gather(loading, *rescans, return_exceptions=True)
            await registry.close(settings.shutdown_timeout)
            parsers.close()
            decoder.close()
            logger.info("stopped")

    app = FastAPI(
        title="resnet-serve",
        description="Image classification with fine-tuned ResNets, dynamically batched.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url=None,  # served by app.api.routes.docs
        redirect_slashes=False,  # a redirect would be built from the request's Host header
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_keys = settings.api_key_values()
    app.state.cluster = cluster
    app.state.feedback = Feedback.from_settings(settings)  # POST /feedback, review samples
    errors.install(app)
    for router in all_routers():  # every module of app.api.routes
        app.include_router(router)  # each router declares who may call it (app.api.auth)
    # the last added runs first: ids for everything, metrics of every answer, the boundary
    # that turns whatever escapes into a JSON answer, then the routes with a fast path
    app.add_middleware(FastPathMiddleware, paths=all_fast_paths())
    app.add_middleware(ErrorBoundaryMiddleware, stopping=lambda: _stopping(app))
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(NoSniffMiddleware)
    return app


def host_threads(requested: int, accelerator: Accelerator, *, processes: int = 1) -> int:
    """Torch's CPU threads: as asked; else one when the models run on CUDA (the host only
    post-processes, and idle OpenMP threads spinning there would take the cores the decode
    threads need), else torch's default divided among the server's `processes`."""
    if requested:
        return requested
    if accelerator.is_cuda:
        return 1
    return max(1, torch.get_num_threads() // processes)


def _stopping(app: FastAPI) -> bool:
    registry = getattr(app.state, "registry", None)
    return registry is not None and registry.closing


def begin_shutdown(app: FastAPI) -> None:
    """Mark the app not-ready and refuse new requests (called on SIGTERM)."""
    registry = getattr(app.state, "registry", None)
    if registry is not None:
        registry.begin_shutdown()


async def _initial_load(registry: ModelRegistry) -> None:
    try:
        report = await registry.reload()
    except ShuttingDownError:
        logger.info("stopped before the models were loaded")
        return
    except CheckpointFolderError as exc:
        logger.error("no model loaded; /ready stays 503: %s", exc)
        return
    except Exception:  # noqa: BLE001 - the service stays up (not ready) and says why
        logger.exception("loading models failed")
        return
    if not registry.ready and not registry.closing:
        logger.warning("no model could be loaded from %s; /ready stays 503 (failed: %s)",
                       registry.settings.checkpoint_dir, report.failed or "none found")


def _install_sighup(registry: ModelRegistry, rescans: set[asyncio.Task[None]]) -> bool:
    def on_sighup() -> None:
        logger.info("SIGHUP: rescanning %s", registry.settings.checkpoint_dir)
        task = asyncio.get_running_loop().create_task(reload_logged(registry),
                                                      name="sighup-reload")
        rescans.add(task)
        task.add_done_callback(rescans.discard)

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        logger.debug("SIGHUP reload not available here")
        return False
    return True
