"""Server-Sent Events framing. Every frame is built here, once, as bytes.

An event's frame is encoded once when the hub fans it out and the same
bytes object goes to every stream. ``data`` is always one line (compact JSON
never contains a raw newline, and ``event_frame`` removes any that came from
elsewhere); ``id`` and ``event`` have CR/LF stripped too, so no value can
inject a field or a frame.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.events.log import StoredEvent

RETRY_MS = 2000
RETRY = b"retry: %d\n\n" % RETRY_MS
HEARTBEAT = b": keep-alive\n\n"


def _one_line(value: bytes) -> bytes:
    """``value`` without any raw CR or LF: it can end neither its line nor the frame."""
    if b"\n" in value or b"\r" in value:
        return value.replace(b"\r", b"").replace(b"\n", b"")
    return value


def _field(value: str) -> bytes:
    return _one_line(value.encode())


def event_frame(event: StoredEvent) -> bytes:
    """``id:``, ``event:`` (the type) and ``data:`` (the event object).

    The event object is one line whatever ``data`` holds: a raw CR or LF is
    removed. In valid JSON one can only be whitespace between tokens, so the
    object means the same without it, and a ``data`` that is not valid JSON
    still cannot end the frame or start another."""
    body = _one_line(event.to_json())
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, _field(event.type), body)


def notice_frame(type_: str, data: dict[str, Any]) -> bytes:
    """A server notice: no ``id:``, so it never moves the client's position."""
    return b"event: %s\ndata: %s\n\n" % (_field(type_), orjson.dumps(data))


def http_chunk(body: bytes) -> bytes:
    """``body`` as one HTTP/1.1 chunk, the framing the server puts around each
    ``send`` of a streamed response: built once per run of events, so the same
    bytes can be written to every stream's socket (``Hub.fan_out``)."""
    return b"%x\r\n%b\r\n" % (len(body), body)
