"""Reading the event log: one event's JSON, history pages, replay and the broker's tail.

Events are read with bare asyncpg (see ``app.db.raw_connection``): these
queries run for every resume and every live batch, and the rows go straight
into frames. ``data`` is stored as the compact JSON text the publisher sent,
so an event's JSON is built by splicing strings, never by decoding ``data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

_SELECT = (
    "SELECT e.id, e.channel_id, c.name, e.type, e.data, e.published_at "
    "FROM events e JOIN channels c ON c.id = e.channel_id "
)
_AFTER_IN_CHANNELS = (
    _SELECT + "WHERE e.channel_id = ANY($1::bigint[]) AND e.id > $2 ORDER BY e.id LIMIT $3"
)
_AFTER = _SELECT + "WHERE e.id > $1 ORDER BY e.id LIMIT $2"


def format_timestamp(at: datetime) -> str:
    """``2026-11-25T10:00:00.123456Z``: UTC, always microseconds, a ``Z``.

    Formatting was a sixth of the CPU of publishing in batches, and all the
    events of a publishing transaction share one time: the last one formatted
    is kept. Postgres hands timestamps over in UTC already.
    """
    global _last_formatted
    if _last_formatted[0] == at:
        return _last_formatted[1]
    utc = at.astimezone(UTC) if at.utcoffset() else at
    text = (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T"
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond:06d}Z"
    )
    _last_formatted = (at, text)
    return text


_last_formatted: tuple[datetime | None, str] = (None, "")


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One committed event, as the log holds it."""

    id: int
    channel_id: int
    channel: str
    type: str
    data: str  # compact JSON text
    published_at: datetime

    def to_json(self) -> bytes:
        """The event object of the API, compact, with ``data`` spliced in as stored."""
        return b"".join(
            (
                b'{"id":',
                str(self.id).encode(),
                b',"channel":',
                orjson.dumps(self.channel),
                b',"type":',
                orjson.dumps(self.type),
                b',"data":',
                self.data.encode(),
                b',"published_at":"',
                format_timestamp(self.published_at).encode(),
                b'"}',
            )
        )


def _event(row: Any) -> StoredEvent:
    return StoredEvent(row[0], row[1], row[2], row[3], row[4], row[5])


async def read_after(
    conn: Any, channel_ids: Sequence[int], after_id: int, limit: int
) -> list[StoredEvent]:
    """Events of ``channel_ids`` with an id above ``after_id``, ascending, at most ``limit``.

    History pages and stream replay both read through here.
    """
    rows = await conn.fetch(_AFTER_IN_CHANNELS, list(channel_ids), after_id, limit)
    return [_event(r) for r in rows]


async def tail(conn: Any, after_id: int, limit: int) -> list[StoredEvent]:
    """Every channel's events above ``after_id``: what the broker fans out live.

    Complete because ids become visible in increasing order (see
    ``app.events.publisher``): nothing can later appear below an id once read.
    """
    rows = await conn.fetch(_AFTER, after_id, limit)
    return [_event(r) for r in rows]


async def last_event_id(conn: Any) -> int:
    """The highest committed id, or 0: where a fresh tail starts."""
    value = await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")
    return int(value)


async def retention_state(
    conn: Any, channel_ids: Sequence[int]
) -> dict[int, tuple[int, int | None]]:
    """Per channel: ``pruned_through`` and the oldest retained id (or None).

    A resume position below ``pruned_through`` is older than the channel's
    retained history: the stream says so with ``ssehub.truncated``.
    """
    rows = await conn.fetch(
        "SELECT c.id, c.pruned_through, "
        "(SELECT min(e.id) FROM events e WHERE e.channel_id = c.id) "
        "FROM channels c WHERE c.id = ANY($1::bigint[])",
        list(channel_ids),
    )
    return {r[0]: (int(r[1]), r[2]) for r in rows}
