"""Prometheus metrics for `GET /metrics`, in a registry per app (so tests can build many apps).

Request metrics are labelled by route template (`/adapters`), never by raw path, so a scanner probing
random URLs cannot blow up the number of series: unmatched paths share the label `unmatched`, and methods
outside HTTP's standard ones the label `other`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.requests = Counter(
            "wildpdiff_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "wildpdiff_request_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generations = Counter("wildpdiff_generations", "adapters generated", registry=self.registry)
        self.cache = Counter("wildpdiff_adapter_cache", "adapter cache lookups", ["result"], registry=self.registry)
        self.queue_depth = Gauge(
            "wildpdiff_queue_depth", "requests admitted and not finished (running + waiting)", registry=self.registry
        )
        # app/batching.py: requests per model call, and how long a request waited for the inference thread
        self.batch_size = Histogram(
            "wildpdiff_batch_size", "requests in one model call", ["kind"], buckets=BATCH_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "wildpdiff_queue_wait_seconds",
            "time from queueing to the start of the request's batch",
            ["kind"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge("wildpdiff_requests_in_flight", "HTTP requests being answered", registry=self.registry)


class MetricsMiddleware:
    """Counts every HTTP request and times it, labelled by the route that handled it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)
