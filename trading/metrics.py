"""Prometheus metrics: one registry and one loopback HTTP endpoint per loop.

Each loop owns a `CollectorRegistry` (so tests and several loops in one process never clash)
and serves it on 127.0.0.1 by default. Hot paths keep labelled children in a dict, because
`metric.labels(...)` costs a lock and a lookup on every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase


@dataclass
class MetricsEndpoint:
    """A running /metrics server; `port` is the bound port (0 asks for a free one)."""

    registry: CollectorRegistry
    host: str
    port: int
    _server: WSGIServer | None = field(default=None, repr=False)
    _thread: Thread | None = field(default=None, repr=False)

    def start(self) -> MetricsEndpoint:
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


class LabelCache:
    """Labelled children of one metric, created once per label tuple."""

    def __init__(self, metric: MetricWrapperBase) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class IngestMetrics:
    """The `ingest_*` families (catalogued in docs/metrics.md)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = LabelCache(Counter("ingest_messages", "Messages received", ["channel", "market"],
                                           registry=r))
        self.parse_errors = LabelCache(Counter("ingest_parse_errors", "Malformed messages skipped", ["channel"],
                                               registry=r))
        self.gaps = LabelCache(Counter("ingest_gaps", "Gap ledger entries by kind", ["channel", "market", "kind"],
                                       registry=r))
        self.resyncs = LabelCache(Counter("ingest_resyncs", "Order book resyncs", ["market"], registry=r))
        self.reconnects = LabelCache(Counter("ingest_reconnects", "WebSocket reconnects", ["channel"], registry=r))
        self.lag = LabelCache(Histogram("ingest_lag_seconds", "Receive time minus exchange time", ["channel"],
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                        registry=r))
        self.stream_length = LabelCache(Gauge("ingest_stream_length", "Entries in the Redis stream", ["stream"],
                                              registry=r))
        self.last_message_age = LabelCache(Gauge("ingest_last_message_age_seconds",
                                                 "Seconds since the last message", ["channel", "market"],
                                                 registry=r))
        self.redis_up = Gauge("ingest_redis_up", "1 while Redis accepts writes", registry=r)
        self.rate_limit_remaining = Gauge("ingest_rate_limit_remaining", "Weight left in this minute's budget",
                                          registry=r)

    def endpoint(self, host: str = "127.0.0.1", port: int = 0) -> MetricsEndpoint:
        return MetricsEndpoint(self.registry, host, port)


def sample_value(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float | None:
    """A sample's current value (tests, preflight checks)."""
    value: float | None = registry.get_sample_value(name, labels or {})
    return value


