"""Prometheus instruments, one registry per app (so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams_open = Gauge("ssehub_streams_open", "Open SSE streams", registry=r)
        self.events_published = Counter(
            "ssehub_events_published", "Events committed to the event log", registry=r
        )
        self.events_delivered = Counter(
            "ssehub_events_delivered", "Event frames written to stream sockets", registry=r
        )
        self.delivery_latency = Histogram(
            "ssehub_delivery_latency_seconds",
            "Publish (commit) to write on the stream socket",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slow_reader_catchups = Counter(
            "ssehub_slow_reader_catchups",
            "Streams whose buffer overflowed and that caught up from the event log",
            registry=r,
        )
        self.slow_reader_disconnects = Counter(
            "ssehub_slow_reader_disconnects", "Streams closed for not reading", registry=r
        )
