"""Server-Sent Events framing. Every frame is built here, once, as bytes.

An event's frame is encoded once when the hub fans it out and the same
bytes object goes to every stream. ``data`` is always one line: compact JSON
never contains a raw newline. ``id`` and ``event`` have CR/LF stripped so no
value can inject a field.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.events.log import StoredEvent

RETRY_MS = 2000
RETRY = b"retry: %d\n\n" % RETRY_MS
HEARTBEAT = b": keep-alive\n\n"


def _field(value: str) -> bytes:
    return value.replace("\r", "").replace("\n", "").encode()


def event_frame(event: StoredEvent) -> bytes:
    """``id:``, ``event:`` (the type) and ``data:`` (the event object)."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, _field(event.type), event.to_json())


def notice_frame(type_: str, data: dict[str, Any]) -> bytes:
    """A server notice: no ``id:``, so it never moves the client's position."""
    return b"event: %s\ndata: %s\n\n" % (_field(type_), orjson.dumps(data))


def http_chunk(body: bytes) -> bytes:
    """``body`` as one HTTP/1.1 chunk, the framing the server puts around each
    ``send`` of a streamed response: built once per run of events, so the same
    bytes can be written to every subscriber's socket (``Hub.fan_out``)."""
    return b"%x\r\n%b\r\n" % (len(body), body)
