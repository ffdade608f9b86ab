"""Prometheus metrics of one endpoint process, in a registry of its own.

A registry per app (not prometheus_client's global one) lets several apps live in one
process (tests, Ray Serve replicas sharing a worker) without duplicate-metric errors.

Exposed series (``GET /metrics``):
    distillery_requests_total{route, method, status}     answered requests
    distillery_request_duration_seconds{route}           latency histogram
    distillery_errors_total{kind}                        error answers by problem kind
    distillery_client_disconnects_total                  requests whose client went away mid-upload
    distillery_batch_size                                views per teacher forward (histogram)
    distillery_batch_duration_seconds                    forward + copy time per batch
    distillery_views_total                               views answered with targets
    distillery_queue_depth                               views admitted, waiting for a batch
    distillery_teacher_ready                             1 once the teacher is loaded
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)


class ServiceMetrics:
    """The counters, histograms and gauges above, plus their text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "distillery_requests", "Answered HTTP requests.", ("route", "method", "status"), registry=self.registry
        )
        self.latency = Histogram(
            "distillery_request_duration_seconds",
            "Time from the first byte of a request to the end of its answer.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter("distillery_errors", "Error answers by problem kind.", ("kind",), registry=self.registry)
        self.client_disconnects = Counter(
            "distillery_client_disconnects",
            "Requests whose client closed the connection before the body was read (not errors of the server).",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "distillery_batch_size", "Views per teacher forward pass.", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_duration = Histogram(
            "distillery_batch_duration_seconds",
            "Teacher forward pass and device-to-host copy per batch.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.views = Counter("distillery_views", "Views answered with targets.", registry=self.registry)
        self.queue_depth = Gauge(
            "distillery_queue_depth", "Views admitted and waiting for a forward pass.", registry=self.registry
        )
        self.ready = Gauge("distillery_teacher_ready", "1 once the teacher is loaded.", registry=self.registry)

    def observe_request(self, route: str, method: str, status: int, started: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
