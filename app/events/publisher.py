"""The ordered write path: every publish in this process goes through one writer.

**Why ids become visible in increasing order.** A plain identity column is
not enough: transaction A takes id 10, B takes 11, B commits first, a reader
sees 11 and moves its cursor past 10 before A commits; 10 is then lost to
every client resuming from 11. Here every publishing transaction, on every
instance, first takes the same transaction-scoped advisory lock
(``pg_advisory_xact_lock(PUBLISH_LOCK)``) and only then draws ids from the
sequence. Postgres releases that lock after the commit is visible. So while
A holds the lock nobody else draws an id, and when B draws its ids A's rows
are already committed with smaller ids: the set of visible ids only ever grows
at the top. "Everything above the last id I saw" is therefore a complete cursor.

**Why it is cheap.** The lock serialises transactions, so each one carries as
much as possible: requests that arrive while a transaction is in flight are
coalesced into the next one. And each transaction is one round trip: the
database function ``ssehub_publish`` (migration 0002) takes the lock, draws
the ids, inserts every row and sends one NOTIFY that wakes every instance's
broker, and the statement's implicit transaction commits as it returns.
Throughput grows with concurrency instead of queueing on the lock.

Within a transaction the ids are drawn first, sorted, and handed to the rows
in request order, so a batch's ids increase in the order given.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import raw_connection
from app.errors import NotFound
from app.events.log import StoredEvent
from app.metrics import Metrics

log = logging.getLogger("ssehub")

PUBLISH_LOCK = 0x55E4B  # the advisory lock every publisher takes, inside ssehub_publish()
MAX_EVENTS_PER_TRANSACTION = 5000

# The function (migrations/versions/0002) takes the lock, draws the ids in request
# order, inserts and notifies: one round trip, committed when the statement ends.
_PUBLISH = "SELECT * FROM ssehub_publish($1::bigint[], $2::text[], $3::text[], $4::text[])"
_EXISTING = (
    "SELECT e.id, e.type, e.data, e.published_at FROM events e "
    "WHERE e.channel_id = $1 AND e.idempotency_key = $2"
)


@dataclass(frozen=True, slots=True)
class NewEvent:
    type: str
    data: str  # compact JSON


@dataclass
class _Request:
    channel_id: int
    channel: str
    items: list[NewEvent]
    idempotency_key: str | None
    done: asyncio.Future[tuple[list[StoredEvent], bool]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Publisher:
    """Coalesces concurrent publishes into ordered transactions (see module docstring)."""

    def __init__(self, engine: AsyncEngine, metrics: Metrics) -> None:
        self._engine = engine
        self._metrics = metrics
        self._pending: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def publish(
        self, channel_id: int, channel: str, items: list[NewEvent], idempotency_key: str | None
    ) -> tuple[list[StoredEvent], bool]:
        """Commit ``items`` to the log; returns the events and whether they are new.

        With an idempotency key already used on this channel, returns the
        first event and ``False``, publishing nothing.
        """
        if self._closed:
            raise RuntimeError("publisher is stopped")
        request = _Request(channel_id, channel, items, idempotency_key)
        self._pending.append(request)
        self._wake.set()
        return await request.done

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ssehub-publisher")

    async def stop(self) -> None:
        """Finish what is pending, then stop."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._write(self._take())
            if self._closed:
                return

    def _take(self) -> list[_Request]:
        """Pending requests for one transaction (at least one, however large)."""
        taken = [self._pending.popleft()]
        count = len(taken[0].items)
        while self._pending and count + len(self._pending[0].items) <= MAX_EVENTS_PER_TRANSACTION:
            request = self._pending.popleft()
            taken.append(request)
            count += len(request.items)
        return taken

    async def _write(self, requests: list[_Request]) -> None:
        """One transaction for all; if it fails, each request alone, so one bad
        request (its channel deleted meanwhile) fails only itself."""
        try:
            results = await self._transaction(requests)
        except Exception as exc:
            if len(requests) == 1:
                self._fail(requests[0], exc)
                return
            for request in requests:
                await self._write([request])
            return
        for request, result in zip(requests, results, strict=True):
            if not request.done.done():
                request.done.set_result(result)

    def _fail(self, request: _Request, exc: Exception) -> None:
        error: Exception = exc
        if isinstance(exc, asyncpg.ForeignKeyViolationError):
            error = NotFound(f"Channel {request.channel!r} not found")
        else:
            log.error("publish failed", exc_info=exc)
        if not request.done.done():
            request.done.set_exception(error)

    async def _transaction(self, requests: list[_Request]) -> list[tuple[list[StoredEvent], bool]]:
        rows = [(r, item) for r in requests for item in r.items]
        async with raw_connection(self._engine) as conn:
            inserted = await conn.fetch(
                _PUBLISH,
                [r.channel_id for r, _ in rows],
                [item.type for _, item in rows],
                [item.data for _, item in rows],
                [r.idempotency_key for r, _ in rows],
            )
            results = await self._match(conn, requests, inserted)
        self._metrics.events_published.inc(len(inserted))
        return results

    async def _match(
        self, conn: Any, requests: list[_Request], inserted: list[Any]
    ) -> list[tuple[list[StoredEvent], bool]]:
        """Pair returned rows with requests, in order; a request whose key was
        already used gets the event stored under that key instead."""
        ids_by_request: list[list[tuple[int, datetime]]] = []
        rows = iter(sorted(inserted, key=lambda row: row["event_id"]))
        keyed_new = {
            (row["event_channel_id"], row["event_key"])
            for row in inserted
            if row["event_key"] is not None
        }
        claimed: set[tuple[int, str]] = set()
        for request in requests:
            key = (request.channel_id, request.idempotency_key or "")
            if request.idempotency_key is not None and (key not in keyed_new or key in claimed):
                ids_by_request.append([])
                continue
            if request.idempotency_key is not None:
                claimed.add(key)
            ids_by_request.append(
                [
                    (row["event_id"], row["event_published_at"])
                    for row in _take_n(rows, len(request.items))
                ]
            )
        results: list[tuple[list[StoredEvent], bool]] = []
        for request, ids in zip(requests, ids_by_request, strict=True):
            if ids:
                events = [
                    StoredEvent(id_, request.channel_id, request.channel, it.type, it.data, at)
                    for (id_, at), it in zip(ids, request.items, strict=True)
                ]
                results.append((events, True))
            else:
                existing = await conn.fetchrow(
                    _EXISTING, request.channel_id, request.idempotency_key
                )
                event = StoredEvent(
                    existing["id"],
                    request.channel_id,
                    request.channel,
                    existing["type"],
                    existing["data"],
                    existing["published_at"],
                )
                results.append(([event], False))
        return results


def _take_n(rows: Any, n: int) -> list[Any]:
    return [next(rows) for _ in range(n)]
