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

# One page of the log past a position, bounded by a count and by bytes of
# ``data`` (a page of 1,000 events of 64 KiB each would be 64 MiB held per slow
# stream): the rows that start within ``$4`` bytes, so a page can pass the bound
# by at most one event. In the same statement, hence the same snapshot, the
# channels pruned past the position (``Gap``): what retention removed before
# this read is known exactly, with no race between the two. And how many rows
# the page had before the byte bound, so a cut page is never taken for the end.
_PAGE = """
WITH page AS (
    SELECT e.id, e.channel_id, e.type, e.data, e.published_at,
           sum(octet_length(e.data)) OVER (ORDER BY e.id) - octet_length(e.data) AS before
    FROM public.events e WHERE {events} AND e.id > $2 AND e.id <= $5 ORDER BY e.id LIMIT $3
)
SELECT 1 AS kind, p.id, p.channel_id, c.name, p.type, p.data, p.published_at, NULL::bigint
FROM page p JOIN public.channels c ON c.id = p.channel_id WHERE p.before < $4
UNION ALL
SELECT 0, c.pruned_through, c.id, c.name, NULL, NULL, NULL,
       (SELECT min(e.id) FROM public.events e WHERE e.channel_id = c.id)
FROM public.channels c WHERE c.pruned_through > $2 AND {channels}
UNION ALL
SELECT 2, count(*), NULL, NULL, NULL, NULL, NULL, NULL FROM page
ORDER BY 1, 2
"""
_PAGE_IN_CHANNELS = _PAGE.format(
    events="e.channel_id = ANY($1::bigint[])", channels="c.id = ANY($1::bigint[])"
)
# The broker's tail: every channel ($1 is unused, but keeps the parameters alike).
_PAGE_ALL = _PAGE.format(events="$1::bigint[] IS NULL", channels="$1::bigint[] IS NULL")
PAGE_EVENTS = 1000
PAGE_BYTES = 1024 * 1024
MAX_ID = 2**63 - 1


def format_timestamp(at: datetime) -> str:
    """``2026-11-25T10:00:00.123456Z``: UTC, always microseconds, a ``Z``.

    All the events of a publishing transaction share one time, and formatting
    each would be a sixth of the CPU of publishing in batches: the last one
    formatted is kept. Postgres hands timestamps over in UTC already.
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


@dataclass(slots=True)
class StoredEvent:
    """One committed event, as the log holds it. Not frozen: a frozen dataclass
    sets each field through ``object.__setattr__``, and a batch makes a
    thousand of these (a tenth of its CPU); nothing changes one all the same."""

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


@dataclass(frozen=True, slots=True)
class Gap:
    """Retention removed every event of a channel at or below ``pruned_through``,
    some of them after the position the page was read from: whoever had not
    delivered them must say so (``ssehub.truncated``) before going on."""

    channel_id: int
    channel: str
    pruned_through: int
    oldest_id: int | None  # the oldest event the channel still has


@dataclass(frozen=True, slots=True)
class Page:
    events: list[StoredEvent]
    gaps: list[Gap]
    more: bool  # cut by the count or the bytes: read on from the last event's id


async def read_page(
    conn: Any,
    channel_ids: Sequence[int] | None,
    after_id: int,
    limit: int = PAGE_EVENTS,
    max_bytes: int = PAGE_BYTES,
    until_id: int = MAX_ID,
) -> Page:
    """Events of ``channel_ids`` (``None``: of every channel) above ``after_id`` (and
    at most ``until_id``), ascending, at most ``limit`` of them and about
    ``max_bytes`` of data, with the channels pruned past ``after_id``. History
    pages, stream replays and the brokers' reads all go through here.

    Complete because ids become visible in increasing order (see
    ``app.events.publisher``): nothing can later appear below an id once read.
    """
    query = _PAGE_ALL if channel_ids is None else _PAGE_IN_CHANNELS
    ids = None if channel_ids is None else list(channel_ids)
    rows = await conn.fetch(query, ids, after_id, limit, max_bytes, until_id)
    events, gaps, read = [], [], 0
    for row in rows:
        kind = row[0]
        if kind == 1:
            events.append(StoredEvent(row[1], row[2], row[3], row[4], row[5], row[6]))
        elif kind == 0:
            gaps.append(Gap(row[2], row[3], row[1], row[7]))
        else:
            read = row[1]
    return Page(events, gaps, read >= limit or read > len(events))


async def last_event_id(conn: Any) -> int:
    """The highest committed id, or 0: where a fresh tail starts."""
    value = await conn.fetchval("SELECT coalesce(max(id), 0) FROM public.events")
    return int(value)


async def last_issued_id(conn: Any) -> int:
    """The highest id the database has ever drawn (committed or not), or 0.

    A resume position above it cannot come from this database (a restore, or
    another deployment): every future id may be below it (``ssehub.reset``)."""
    value = await conn.fetchval(
        "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('public.events', 'id')), 0)"
    )
    return int(value)
