"""Stored events for unit tests: one fixed time, so frames can be compared byte for byte."""

from __future__ import annotations

from datetime import UTC, datetime

from app.events.log import StoredEvent

AT = datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)


def stored_event(
    id_: int, channel_id: int = 1, type_: str = "message", data: str = '{"a":1}'
) -> StoredEvent:
    return StoredEvent(id_, channel_id, "news", type_, data, AT)
