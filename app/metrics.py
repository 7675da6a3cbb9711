"""Prometheus metrics, kept in a per-app CollectorRegistry."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DROP_EVENTS = ("expired", "disconnected", "failed")
# every label value comes from a closed set, so no request can add series
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "other"
UNMATCHED_ROUTE = "unmatched"
CONNECTION_EVENTS = ("refused", "dropped", "header_timeout", "body_timeout")


class Metrics:
    """The service's metrics; each app gets its own registry so tests can build many apps."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
                                 ["model"], registry=self.registry)
        self.dropped = Counter(f"{prefix}_images_dropped",
                               "queued images never run, by reason "
                               "(expired: deadline passed, disconnected: client gone, "
                               "failed: batch error)",
                               ["model", "reason"], registry=self.registry)
        self.rejected = Counter(f"{prefix}_images_rejected",
                                "images refused with 429 because the queue was full",
                                ["model"], registry=self.registry)
        self.overloaded = Counter(f"{prefix}_overloaded_responses",
                                  "requests answered 429", registry=self.registry)
        self.models_loaded = Gauge(f"{prefix}_models_loaded", "models serving",
                                   registry=self.registry)
        self.reloads = Counter(f"{prefix}_reloads", "checkpoint folder rescans",
                               registry=self.registry)
        self.connections_open = Gauge(f"{prefix}_connections_open",
                                      "client connections being served", registry=self.registry)
        self.connection_events = Counter(
            f"{prefix}_connection_events",
            "connections refused over max_connections (refused: answered 503, dropped: "
            "closed at once) or closed by a deadline (header_timeout, body_timeout)",
            ["event"], registry=self.registry)

    def batcher_hook(self, model: str) -> Callable[[str, int], None]:
        """An event hook for one model's DynamicBatcher."""

        def hook(event: str, count: int) -> None:
            if event == "batch":
                self.batch_size.labels(model).observe(count)
                self.images.labels(model).inc(count)
            elif event == "rejected":
                self.rejected.labels(model).inc(count)
            elif event in DROP_EVENTS:
                self.dropped.labels(model, event).inc(count)

        return hook

    def watch_queue(self, model: str, depth: Callable[[], float]) -> None:
        """Report `depth()` as the model's queue depth at each scrape."""
        self.queue_depth.labels(model).set_function(depth)

    def forget_model(self, model: str) -> None:
        """Stop reporting the queue depth of a model that is gone."""
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
        self.connections_open.set_function(count)

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
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
