"""SSE framing (``app.realtime.sse``): exact frames, and no field or frame
injected by what an event carries."""

from __future__ import annotations

import orjson

from app.realtime.sse import event_frame, notice_frame
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
