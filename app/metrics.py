"""Prometheus instruments, one registry per app (so tests can run several apps).

Deliveries are counted by ``Deliveries``, not by prometheus_client's Counter
and Histogram: those take a lock per update, and under a 10,000-way fan-out
one update per delivery cost about a tenth of the server's CPU. The event
loop is one thread, so plain integers do; ``collect`` renders them as the
same two metric families.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Deliveries:
    """``ssehub_events_delivered_total``, ``ssehub_delivery_latency_seconds`` and
    ``ssehub_direct_writes_total``."""

    def __init__(self) -> None:
        self.total = 0
        # Runs of live events the hub wrote straight to a stream's socket, one per
        # stream and run (``Hub.fan_out``): it stays at 0 if the direct write
        # (``app.realtime.direct_write``) stops engaging.
        self.direct_writes = 0
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last is +Inf only
        self._latency_sum = 0.0

    def count(self, n: int) -> None:
        """``n`` events written without a live latency (replayed from the log)."""
        self.total += n

    def observe(self, now: float, published: Iterable[float], copies: int = 1) -> None:
        """Live events written at ``now`` (their publish timestamps), each to
        ``copies`` streams: one latency per delivery."""
        if copies <= 0:
            return
        counts = self._counts
        n, total = 0, 0.0
        for at in published:
            latency = now - at if now > at else 0.0
            counts[bisect_left(LATENCY_BUCKETS, latency)] += copies
            total += latency
            n += 1
        self.total += n * copies
        self._latency_sum += total * copies

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "ssehub_events_delivered",
            "Event frames written to stream sockets",
            value=self.total,
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "ssehub_delivery_latency_seconds",
            "Publish (commit) to write on the stream socket",
            buckets=buckets,
            sum_value=self._latency_sum,
        )
        yield CounterMetricFamily(
            "ssehub_direct_writes",
            "Runs of live events written straight to a stream's socket by the fan-out, "
            "without waking the stream's writer task",
            value=self.direct_writes,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams_open = Gauge("ssehub_streams_open", "Open SSE streams", registry=r)
        self.events_published = Counter(
            "ssehub_events_published", "Events committed to the event log", registry=r
        )
        self.deliveries = Deliveries()
        r.register(self.deliveries)
        self.slow_reader_catchups = Counter(
            "ssehub_slow_reader_catchups",
            "Streams whose buffer overflowed and that caught up from the event log",
            registry=r,
        )
        self.slow_reader_disconnects = Counter(
            "ssehub_slow_reader_disconnects", "Streams closed for not reading", registry=r
        )
        self.broker_events = Counter(
            "ssehub_broker_events",
            "Events the broker received for this instance's streams, by source: "
            "the log (Postgres broker, or the NATS broker filling a gap), NATS, or "
            "this instance's own commit (either broker's committer shortcut)",
            ["source"],
            registry=r,
        )
        self.presence_users = Gauge(
            "ssehub_presence_users",
            "Users with a stream on this instance in a presence channel (app.realtime.presence)",
            registry=r,
        )
        self.presence_lease_writes = Counter(
            "ssehub_presence_lease_writes",
            "Presence leases this instance wrote or deleted (a turn's in one transaction)",
            registry=r,
        )
        self.presence_write_transactions = Counter(
            "ssehub_presence_write_transactions",
            "Transactions in which this instance wrote presence leases (one a turn at most)",
            registry=r,
        )
        self.presence_dead_leaves = Counter(
            "ssehub_presence_dead_leaves",
            "Users who left a presence channel because their instance stopped renewing "
            "its heartbeat, as found by this instance",
            registry=r,
        )
        self.nats_safety_net_looks = Counter(
            "ssehub_nats_safety_net_looks",
            "Times the NATS broker compared the log's head with its position, the net "
            "for lost messages: behind on two looks running, it reads the log",
            registry=r,
        )
        self.nats_dropped = Counter(
            "ssehub_nats_dropped",
            "Messages on ssehub's NATS subjects that the NATS broker dropped, by reason: "
            "unsealed (not sealed with this deployment's key for that subject: forged, "
            "altered, or another deployment's), replayed (a copy of one received before), "
            "malformed (sealed, but not a message ssehub sends), beyond_head (names an id "
            "the database never issued)",
            ["reason"],
            registry=r,
        )
