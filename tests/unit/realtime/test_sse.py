"""SSE framing (``app.realtime.sse``): exact frames, and no field or frame
injected by what an event carries."""

from __future__ import annotations

import orjson

from app.realtime.sse import HEARTBEAT, RETRY, RETRY_MS, event_frame, http_chunk, notice_frame
from tests.unit.events import stored_event


def test_event_frame_is_exact() -> None:
    assert event_frame(stored_event(42)) == (
        b"id: 42\nevent: message\n"
        b'data: {"id":42,"channel":"news","type":"message","data":{"a":1},'
        b'"published_at":"2026-11-25T10:00:00.123456Z"}\n\n'
    )


def test_frame_fields_cannot_be_injected() -> None:
    frame = event_frame(stored_event(1, type_="evil\r\nid: 999"))
    assert frame.count(b"\nid:") == 0 and frame.startswith(b"id: 1\nevent: evilid: 999\n")
    assert (
        notice_frame("ssehub.live", {"replayed": 3})
        == b'event: ssehub.live\ndata: {"replayed":3}\n\n'
    )


def test_raw_newlines_in_data_cannot_inject_a_frame() -> None:
    """``data`` that is not the compact JSON the log holds (a NATS message's, say)
    still makes one frame of one ``data:`` line, with the same JSON value."""
    data = '{"a":\n1,\r\n"b":"x"}\n\nid: 999\nevent: injected\ndata: {}'
    frame = event_frame(stored_event(7, data=data))
    assert frame.count(b"\n\n") == 1 and frame.endswith(b"\n\n")
    assert frame.count(b"\nid:") == 0 and b"\nevent: injected" not in frame
    valid = event_frame(stored_event(8, data='{"a":\n1,\r\n"b":"x"}'))
    body = valid.split(b"data: ", 1)[1]
    assert orjson.loads(body)["data"] == {"a": 1, "b": "x"}


def test_a_notice_type_cannot_inject_a_field() -> None:
    frame = notice_frame("ssehub.gap\r\nid: 5", {"after": 3})
    assert frame == b'event: ssehub.gapid: 5\ndata: {"after":3}\n\n'


def test_an_event_type_loses_lone_carriage_returns_too() -> None:
    """A lone CR ends a line for an SSE parser as LF does."""
    frame = event_frame(stored_event(2, type_="a\rretry: 1"))
    assert frame.startswith(b"id: 2\nevent: aretry: 1\ndata: ") and b"\r" not in frame


def test_a_chunk_is_sized_in_hex_and_ends_with_crlf() -> None:
    assert http_chunk(b"") == b"0\r\n\r\n"
    body = b"x" * 300
    assert http_chunk(body) == b"12c\r\n" + body + b"\r\n"


def test_retry_and_heartbeat_are_whole_frames() -> None:
    assert RETRY == b"retry: %d\n\n" % RETRY_MS and RETRY.count(b"\n\n") == 1
    assert HEARTBEAT.startswith(b":") and HEARTBEAT.endswith(b"\n\n")
