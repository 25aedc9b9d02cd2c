"""Metrics (``app.metrics``) as Prometheus renders them."""

from __future__ import annotations

from prometheus_client import generate_latest

from app.metrics import Metrics


def test_delivery_metrics_count_and_bucket_latencies() -> None:
    metrics = Metrics()
    metrics.deliveries.observe(100.0, [99.9995, 99.5, 101.0])  # a clock skew counts as 0
    metrics.deliveries.count(5)
    text = generate_latest(metrics.registry).decode()
    assert "ssehub_events_delivered_total 8.0" in text
    assert 'ssehub_delivery_latency_seconds_bucket{le="0.001"} 2.0' in text
    assert 'ssehub_delivery_latency_seconds_bucket{le="0.5"} 3.0' in text
    assert 'ssehub_delivery_latency_seconds_bucket{le="+Inf"} 3.0' in text
    assert "ssehub_delivery_latency_seconds_count 3.0" in text
