"""Framing, delivery metrics and control hints as plain unit tests (the streams
and the hub's calls on them: ``tests/unit/realtime``)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from prometheus_client import generate_latest

from app.events.log import StoredEvent
from app.metrics import Metrics
from app.notify import MAX_HINTS, Hints
from app.realtime.sse import event_frame, notice_frame

AT = datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)


def _event(
    id_: int, channel_id: int = 1, type_: str = "message", data: str = '{"a":1}'
) -> StoredEvent:
    return StoredEvent(id_, channel_id, "news", type_, data, AT)


def test_event_frame_is_exact() -> None:
    assert event_frame(_event(42)) == (
        b"id: 42\nevent: message\n"
        b'data: {"id":42,"channel":"news","type":"message","data":{"a":1},'
        b'"published_at":"2026-11-25T10:00:00.123456Z"}\n\n'
    )


def test_frame_fields_cannot_be_injected() -> None:
    frame = event_frame(_event(1, type_="evil\r\nid: 999"))
    assert frame.count(b"\nid:") == 0 and frame.startswith(b"id: 1\nevent: evilid: 999\n")
    assert (
        notice_frame("ssehub.live", {"replayed": 3})
        == b'event: ssehub.live\ndata: {"replayed":3}\n\n'
    )


def test_raw_newlines_in_data_cannot_inject_a_frame() -> None:
    """``data`` that is not the compact JSON the log holds (a NATS message's, say)
    still makes one frame of one ``data:`` line, with the same JSON value."""
    data = '{"a":\n1,\r\n"b":"x"}\n\nid: 999\nevent: injected\ndata: {}'
    frame = event_frame(_event(7, data=data))
    assert frame.count(b"\n\n") == 1 and frame.endswith(b"\n\n")
    assert frame.count(b"\nid:") == 0 and b"\nevent: injected" not in frame
    valid = event_frame(_event(8, data='{"a":\n1,\r\n"b":"x"}'))
    body = valid.split(b"data: ", 1)[1]
    assert orjson.loads(body)["data"] == {"a": 1, "b": "x"}


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


def test_control_hints_take_only_what_ssehub_sends_within_a_bound() -> None:
    """Anyone may NOTIFY: a message ssehub does not send merges nothing, and a
    flood of distinct ids turns into one re-check of everything, not a set
    that grows with the flood."""
    hints = Hints()
    for message in (
        [],
        "x",
        {"op": "subscribed"},
        {"op": "subscribed", "user_id": "1"},
        {"op": "subscribed", "user_id": True},
        {"op": "subscribed", "user_id": 1.0},
        {"op": "subscribed", "user_id": 0},
        {"op": "subscribed", "user_id": -5},
        {"op": "subscribed", "user_id": 2**63},
        {"op": "granted", "user_id": 1},
        {"op": ["subscribed"], "user_id": 1},
    ):
        assert not hints.add(message), message
    assert not hints
    assert hints.add({"op": "unsubscribed", "user_id": 7, "channel_id": 3, "channel": "x"})
    assert hints.add({"op": "channel_deleted", "channel_id": 3, "channel": "anything"})
    assert hints.add({"op": "api_key_revoked", "key_id": 2})
    assert (hints.subscribers, hints.channels, hints.api_keys) == ({7}, {3}, {2})
    assert hints.changed() and not hints.everything
    for n in range(1, MAX_HINTS + 1):
        assert hints.add({"op": "user_changed", "user_id": n})
    assert hints.everything
    assert not (hints.users or hints.subscribers or hints.channels or hints.api_keys)
    only_recheck = Hints()
    only_recheck.recheck_streams_of(4)
    assert only_recheck and not only_recheck.changed()
