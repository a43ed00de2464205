"""HTTP metrics with prometheus-fastapi-instrumentator's default families and labels, so
dashboards built for it work: requests by handler/method/status class, sizes, and durations.
Probes and /metrics are left out (they are scraped or polled many times a second).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EXCLUDED = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})
HIGHR_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5,
                 4.0, 4.5, 5.0, 7.5, 10.0, 30.0, 60.0)  # fmt: skip


class HttpMetrics:
    """The five instrumentator families, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "http_requests_total", "Total number of requests by method, status and handler.",
            ["method", "status", "handler"], registry=registry,
        )  # fmt: skip
        self.request_size = Summary(
            "http_request_size_bytes", "Content length of incoming requests by handler. "
            "Only value of header is respected. Otherwise ignored.", ["handler"], registry=registry,
        )  # fmt: skip
        self.response_size = Summary(
            "http_response_size_bytes", "Content length of outgoing responses by handler. "
            "Only value of header is respected. Otherwise ignored.", ["handler"], registry=registry,
        )  # fmt: skip
        self.latency_highr = Histogram(
            "http_request_duration_highr_seconds",
            "Latency with many buckets but no API specific labels. Made for more accurate "
            "percentile calculations.", buckets=HIGHR_BUCKETS, registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Latency with only few buckets by handler. Made to be only used if aggregation by "
            "handler is important.", ["method", "handler"], buckets=(0.1, 0.5, 1.0),
            registry=registry,
        )  # fmt: skip

    def observe(self, method: str, handler: str, status: int, req_size: int, resp_size: int,
                seconds: float) -> None:  # fmt: skip
        self.requests.labels(method, f"{status // 100}xx", handler).inc()
        self.request_size.labels(handler).observe(req_size)
        self.response_size.labels(handler).observe(resp_size)
        self.latency_highr.observe(seconds)
        self.latency.labels(method, handler).observe(seconds)


class HttpMetricsMiddleware:
    """Times every request to completion (a stream's last byte) and records it by route."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXCLUDED:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status, sent = 500, 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", None) or "none"
            declared = dict(scope["headers"]).get(b"content-length", b"0")
            size = int(declared) if declared.isdigit() else 0
            self.metrics.observe(
                scope["method"], handler, status, size, sent, time.perf_counter() - start
            )
