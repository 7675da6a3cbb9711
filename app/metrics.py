"""Prometheus metrics: a per-app CollectorRegistry, or one view over every worker process.

With `--workers N` each worker writes its metrics to files in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, set up by app.process.supervisor) and any worker's /metrics
adds them up: counters and histograms over every worker that ever ran, gauges over the live
ones. Values read on demand (queue depth, open connections) are written at each worker tick.
The folder's life (claimed, dead workers' files folded into archives, removed) is
app.process.metrics_files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app.process.metrics_files import hold_folder, scrape_lock
from app.serving.drift import DriftMetrics

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DROP_EVENTS = ("expired", "disconnected", "failed")
# every label value comes from a closed set, so no request can add series
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "other"
UNMATCHED_ROUTE = "unmatched"
CONNECTION_EVENTS = ("refused", "dropped", "header_timeout", "body_timeout", "write_timeout")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The service's metrics; each app gets its own registry so tests can build many apps."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, multiprocess_mode: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_mode and MULTIPROC_ENV in os.environ
        self.folder = Path(os.environ[MULTIPROC_ENV]) if self.multiprocess else None
        # held for the process's life: the folder is in use, no other supervisor removes it
        self._folder_hold = hold_folder(self.folder) if self.folder else None
        self._watched: list[tuple[Gauge, Callable[[], float]]] = []
        prefix = "resnet_serve"
        self.requests = Counter(f"{prefix}_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram(f"{prefix}_request_duration_seconds",
                                 "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(f"{prefix}_batch_size", "images per model batch",
                                    ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.images = Counter(f"{prefix}_images", "images run through a model", ["model"],
                              registry=self.registry)
        self.queue_depth = Gauge(f"{prefix}_queue_depth", "images waiting per model",
                                 ["model"], registry=self.registry,
                                 multiprocess_mode="livesum")
        self.dropped = Counter(f"{prefix}_images_dropped",
                               "queued images never run, by reason "
                               "(expired: deadline passed, disconnected: client gone, "
                               "failed: batch error)",
                               ["model", "reason"], registry=self.registry)
        self.explain_batch_size = Histogram(
            f"{prefix}_explain_batch_size", "images per POST /explain batch", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry)
        self.explained = Counter(f"{prefix}_images_explained",
                                 "images run through a model's class activation map",
                                 ["model"], registry=self.registry)
        self.rejected = Counter(f"{prefix}_images_rejected",
                                "images refused with 429 because the queue was full",
                                ["model"], registry=self.registry)
        self.overloaded = Counter(f"{prefix}_overloaded_responses",
                                  "requests answered 429", registry=self.registry)
        self.models_loaded = Gauge(f"{prefix}_models_loaded",
                                   "models serving (with several workers: in every one)",
                                   registry=self.registry, multiprocess_mode="livemin")
        self.reloads = Counter(f"{prefix}_reloads", "checkpoint folder rescans",
                               registry=self.registry)
        self.connections_open = Gauge(f"{prefix}_connections_open",
                                      "client connections being served", registry=self.registry,
                                      multiprocess_mode="livesum")
        self.workers_ready = Gauge(f"{prefix}_workers_ready",
                                   "server worker processes ready to serve",
                                   registry=self.registry, multiprocess_mode="livemax")
        self.connection_events = Counter(
            f"{prefix}_connection_events",
            "connections refused over max_connections (refused: answered 503, dropped: "
            "closed at once) or closed by a deadline (header_timeout, body_timeout, write_timeout)",
            ["event"], registry=self.registry)
        self.drift = DriftMetrics(self.registry)  # per-model quality and drift (app.serving.drift)

    def batcher_hook(self, model: str, *, explain: bool = False) -> Callable[[str, int], None]:
        """An event hook for one model's DynamicBatcher (its /explain one with `explain`:
        batches counted apart, refusals and drops with the model's)."""
        sizes, images = ((self.explain_batch_size, self.explained) if explain
                         else (self.batch_size, self.images))

        def hook(event: str, count: int) -> None:
            if event == "batch":
                sizes.labels(model).observe(count)
                images.labels(model).inc(count)
            elif event == "rejected":
                self.rejected.labels(model).inc(count)
            elif event in DROP_EVENTS:
                self.dropped.labels(model, event).inc(count)

        return hook

    def _watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        if self.multiprocess:  # the files hold values, not functions: refresh() writes them
            self._unwatch(gauge)
            self._watched.append((gauge, read))
            gauge.set(read())
        else:
            gauge.set_function(read)

    def _unwatch(self, gauge: Gauge) -> None:
        self._watched = [(g, f) for g, f in self._watched if g is not gauge]

    def refresh(self) -> None:
        """Write the current value of every watched gauge (multiprocess mode, each tick)."""
        for gauge, read in self._watched:
            gauge.set(read())

    def watch_queue(self, model: str, depth: Callable[[], float]) -> None:
        """Report `depth()` as the model's queue depth at each scrape."""
        self._watch(self.queue_depth.labels(model), depth)

    def forget_model(self, model: str) -> None:
        """Stop reporting the queue depth of a model that is gone."""
        gauge = self.queue_depth.labels(model)
        self._unwatch(gauge)
        self.drift.forget(model)
        gauge.set(0)  # a worker's file keeps the last value written
        with contextlib.suppress(KeyError):
            self.queue_depth.remove(model)

    def connection_hook(self) -> Callable[[str], None]:
        """An event hook for the server's connection guard."""

        def hook(event: str) -> None:
            if event in CONNECTION_EVENTS:
                self.connection_events.labels(event).inc()

        return hook

    def watch_connections(self, count: Callable[[], float]) -> None:
        """Report `count()` as the number of open client connections at each scrape."""
        self._watch(self.connections_open, count)

    def watch_workers(self, count: Callable[[], float]) -> None:
        """Report `count()` as the number of ready worker processes."""
        self._watch(self.workers_ready, count)

    def observe_request(self, route: str | None, method: str, status: int,
                        seconds: float) -> None:
        """Count one answered HTTP request; `route` is the matched route template or None."""
        route = route or UNMATCHED_ROUTE
        method = method if method in METHODS else OTHER_METHOD
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status == 429:
            self.overloaded.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition (of every worker, in multiprocess mode); reads
        files, so call it off the event loop."""
        if self.folder is None:
            return generate_latest(self.registry)
        view = CollectorRegistry()
        multiprocess.MultiProcessCollector(view, path=str(self.folder))
        with scrape_lock(self.folder):
            return generate_latest(view)
