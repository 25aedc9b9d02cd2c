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
coalesced into the next one. And each transaction is one round trip on the
writer's own connection: the database function ``ssehub_publish_as``
(``app/events/sql``) checks every request's caller (an admin or an API key that
still exists) and channel, takes the lock, draws the ids, inserts the rows
that pass and sends one NOTIFY that wakes every instance's broker; the
statement's implicit transaction commits as it returns. The writer itself
costs a publish no pooled connection checkout (the rights check before it
mostly answers from memory, ``app.events.rights``). Throughput grows with
concurrency instead of queueing on the lock.

Within a transaction the ids are drawn first, sorted, and handed to the rows
in request order, so a batch's ids increase in the order given.

**Rights before the lock.** The function checks every row's caller and
channel before it takes the lock, and takes none when no row passes; and a
request only reaches this writer after ``app.events.rights`` let it through.
So a caller who may not publish never makes anybody's publish wait.

**Failures, and why nothing is published twice.** The one statement is the
whole transaction: it either commits as it returns, or the server reports an
error for it and it rolled back. Only an error that says so (a constraint, bad
data: ``_rolled_back``) is treated as a rollback: the requests are then
retried one by one so that only the bad one fails. A wait for the publish lock
that ran out (``LOCK_WAIT_SECONDS``: someone holds it too long) rolled back
too, but says nothing about the requests: all of them answer 503 at once,
retried by nobody here. Everything else leaves the outcome unknown: a lost
connection, a server shutting down (57P01 may arrive after the commit), a
cancelled statement (57014: the cancel may land after the commit), a
timeout, a cancelled writer. Then nothing is retried; every request in flight
answers 503, and the client's retry with its ``Idempotency-Key`` settles it.
No query runs after the commit (a duplicate's first events come back from the
same statement), so no later failure can be mistaken for a rollback.

**No statement outlives its wait.** The functions wait at most
``LOCK_WAIT_SECONDS`` for the publish lock, less than the writer waits for
them (``WRITE_TIMEOUT_SECONDS``), and do a bounded amount of work once they
hold it (``MAX_EVENTS_PER_TRANSACTION`` events, or one move of the inbox). If
the writer's wait runs out all the same, asyncpg asks the server to cancel the
statement; the writer waits for the server to confirm that it ended before
it uses the connection again, and closes it otherwise. So no statement of a
writer that gave up keeps running, or keeps holding the lock, behind its back.

**Bounded.** At most ``MAX_PENDING_EVENTS`` events or ``MAX_PENDING_BYTES``
wait for the writer; past that a publish is answered 503 at once, so a burst
never turns into unbounded memory or unbounded latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.auth.identity import Caller
from app.channels.service import lookup_name
from app.db import asyncpg_dsn, connection_options
from app.errors import Forbidden, NotFound, SsehubError, Unauthorized, Unavailable
from app.events import inbox
from app.events.log import StoredEvent
from app.metrics import Metrics

log = logging.getLogger("ssehub")

PUBLISH_LOCK = 0x55E4B  # the advisory lock every publisher takes: ssehub_publish_lock()
MAX_PENDING_EVENTS = 20_000
MAX_PENDING_BYTES = 64 * 1024 * 1024
# Every statement of the writer; past it the outcome is unknown (503).
WRITE_TIMEOUT_SECONDS = 10.0
# The longest a statement of the writer waits for the publish lock; past it, 503.
LOCK_WAIT_SECONDS = 5.0
_LOCK_WAIT_MS = int(LOCK_WAIT_SECONDS * 1000)
# How long a connection whose statement timed out may take to confirm it ended.
CANCEL_WAIT_SECONDS = 5.0
# Small enough that the database writes one transaction while the server parses
# and answers the requests around it: with 5,000, four clients sending batches
# of 1,000 waited for each other, 43k events/s; with 1,000, 53k.
MAX_EVENTS_PER_TRANSACTION = 1000
WRITER_NAME = "ssehub-writer"

# The function (app/events/sql) checks each row's caller and channel, takes the
# lock, draws the ids in request order, inserts and notifies: one round trip,
# committed when the statement ends. One status per row, in row order. Named with
# its schema and typed, so no overload someone else defined can be picked.
_PUBLISH = (
    "SELECT * FROM public.ssehub_publish_as($1::bigint[], $2::bigint[], $3::text[], "
    "$4::text[], $5::text[], $6::text[], $7::integer[], $8::integer)"
)
# Errors after which the transaction may have committed (see "Failures").
_OUTCOME_UNKNOWN_STATES = frozenset({"57P01", "57P02", "57P03", "57014"})
_LOCK_NOT_AVAILABLE = "55P03"


@dataclass(slots=True)
class NewEvent:
    type: str
    data: str  # compact JSON


@dataclass
class _Request:
    user_id: int | None  # the caller: a user,
    key_id: int | None  # or an API key
    channel: str
    items: list[NewEvent]
    idempotency_key: str | None
    size: int
    done: asyncio.Future[tuple[list[StoredEvent], bool]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Publisher:
    """Coalesces concurrent publishes into ordered transactions (see module docstring)."""

    def __init__(
        self,
        database_url: str,
        metrics: Metrics,
        on_commit: Callable[[list[StoredEvent], int], None],
        pgbouncer: bool = False,
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._options = connection_options(WRITER_NAME, WRITE_TIMEOUT_SECONDS, pgbouncer)
        self._metrics = metrics
        self._conn: asyncpg.Connection | None = None
        self._pending: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._inbox_due = True  # rows may have waited while no instance ran
        self._mover = inbox.Mover()
        self._poll: asyncio.TimerHandle | None = None  # the mover's next poll
        self._pending_events = 0
        self._pending_bytes = 0
        self.busy_since = 0.0  # monotonic start of the transaction in flight, 0 if none
        # Called with each committed transaction's new events (in id order) and the
        # log's head before them: see ``Broker.committed``.
        self.on_commit = on_commit

    async def publish(
        self,
        caller: Caller,
        channel: str,
        items: list[NewEvent],
        idempotency_key: str | None,
    ) -> tuple[list[StoredEvent], bool]:
        """Commit ``items`` to ``channel`` as ``caller``; returns the events and
        whether they are new.

        Raises 401 if the user or the API key no longer exists, 403 if the user
        is not an admin, 404 if there is no such channel. With an idempotency key
        already used on this channel, returns the first event and ``False``,
        publishing nothing.
        """
        if self._closed:
            raise Unavailable("The server is shutting down")
        size = sum(len(item.data) for item in items)
        if (
            self._pending_events + len(items) > MAX_PENDING_EVENTS
            or self._pending_bytes + size > MAX_PENDING_BYTES
        ):
            raise Unavailable("Too many publishes are waiting; retry shortly")
        key_id = caller.api_key.id if caller.api_key else None
        request = _Request(caller.user_id, key_id, channel, items, idempotency_key, size)
        self._pending.append(request)
        self._pending_events += len(items)
        self._pending_bytes += size
        self._wake.set()
        return await request.done

    def stuck_for(self, now: float) -> float:
        """How long the transaction in flight has been running (0 if none):
        readiness fails when the writer is stuck."""
        return now - self.busy_since if self.busy_since else 0.0

    async def run(self) -> None:
        """Write until ``close``; then finish what is pending, and return."""
        self._wake.set()
        try:
            await self._run()
        finally:
            if self._poll is not None:
                self._poll.cancel()
            if self._conn is not None:
                await self._leave_inbox(self._conn)
                await self._conn.close()

    def close(self) -> None:
        """Take no more publishes: ``run`` finishes those pending and returns."""
        self._closed = True
        self._wake.set()

    async def _leave_inbox(self, conn: asyncpg.Connection) -> None:
        """Enqueues notify again once this mover stops polling (the flag set is
        never wrong, only a cost): else they would wait for another instance's
        safety net."""
        if self._mover.asleep or conn.is_closed():
            return
        try:
            await self._mover.settle(conn)
        except Exception as exc:
            log.warning("could not tell enqueues to notify (%s: %s)", type(exc).__name__, exc)

    def inbox_due(self) -> None:
        """Rows enqueued from SQL may be waiting (``app.events.inbox``): move them."""
        self._inbox_due = True
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # One move of the inbox, then one transaction of the API's publishes:
            # a backfill moved in many moves delays a publish by one move at most.
            # Stopping, only the requests waiting here are finished: the inbox
            # waits for any writer, on any instance.
            while self._pending or self._inbox_wanted():
                if self._inbox_wanted():
                    self._inbox_due = False
                    await self._move_inbox()
                if self._pending:
                    await self._write(self._take())
            if self._closed:
                return

    def _inbox_wanted(self) -> bool:
        return self._inbox_due and not self._closed

    async def _move_inbox(self) -> None:
        """One move of the inbox's committed rows into the log; another is due
        if rows are left. Failing is safe at any point (each move commits or not
        as a whole): the rows wait for the next wake-up, on this instance or another."""
        self.busy_since = time.monotonic()
        try:
            conn = await self._connection()
            moved = await self._mover.move(conn, self.on_commit, _LOCK_WAIT_MS)
            self._metrics.events_published.inc(moved.appended)
            self._inbox_due = self._inbox_due or moved.more
        except Exception as exc:
            log.warning("moving enqueued events failed (%s: %s)", type(exc).__name__, exc)
            if not _rolled_back(exc):
                await self._after_unknown_outcome()
        finally:
            self.busy_since = 0.0
            self._schedule_poll()

    def _schedule_poll(self) -> None:
        """The mover's next poll, one timer for the writer (none while asleep)."""
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        delay = self._mover.next_poll()
        if delay is not None and not self._closed:
            self._poll = asyncio.get_running_loop().call_later(delay, self.inbox_due)

    def _take(self) -> list[_Request]:
        """Pending requests for one transaction (at least one, however large)."""
        taken = [self._pending.popleft()]
        count = len(taken[0].items)
        while self._pending and count + len(self._pending[0].items) <= MAX_EVENTS_PER_TRANSACTION:
            request = self._pending.popleft()
            taken.append(request)
            count += len(request.items)
        self._pending_events -= count
        self._pending_bytes -= sum(request.size for request in taken)
        return taken

    async def _connection(self) -> asyncpg.Connection:
        """The writer's own connection, opened again once it is lost."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, **self._options)
        return self._conn

    async def _write(self, requests: list[_Request]) -> None:
        """One transaction for all. If the database refused it, it rolled back:
        each request alone then, so one bad request fails only itself. If the
        outcome is unknown: 503 for all, no retry (see "Failures")."""
        self.busy_since = time.monotonic()
        try:
            results = await self._transaction(requests)
        except BaseException as exc:
            if _rolled_back(exc) and not _lock_busy(exc) and len(requests) > 1:
                for request in requests:
                    await self._write([request])
                return
            error = self._error(requests[0], exc)
            for request in requests:
                _settle(request, error)
            if not isinstance(exc, Exception):
                self._drop_connection()
                raise  # cancelled: the requests are answered, the task ends
            if not _rolled_back(exc):
                await self._after_unknown_outcome()  # once they are answered
            return
        finally:
            self.busy_since = 0.0
        for request, result in zip(requests, results, strict=True):
            _settle(request, result)

    def _error(self, request: _Request, exc: BaseException) -> Exception:
        """What a failed transaction answers: 404 for a channel deleted under it,
        503 when the publish lock stayed taken or the outcome is unknown, else
        the error itself (a 500, logged)."""
        if isinstance(exc, asyncpg.ForeignKeyViolationError):
            return NotFound(f"Channel {request.channel!r} not found")
        if _lock_busy(exc):
            log.warning(
                "the publish lock stayed taken for %.0f s; answering 503", LOCK_WAIT_SECONDS
            )
            return Unavailable("Publishing is busy; retry shortly")
        if _rolled_back(exc):
            log.error("publish failed", exc_info=exc)
            assert isinstance(exc, Exception)
            return exc
        log.warning("publish outcome unknown (%s: %s); answering 503", type(exc).__name__, exc)
        return Unavailable("The database did not confirm the publish; retry it")

    async def _after_unknown_outcome(self) -> None:
        """Keep the connection only once the server confirmed that its last
        statement ended (asyncpg asked it to cancel one that timed out, and
        waits for that before it runs another): else close it."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return
        try:
            await conn.execute("SELECT 1", timeout=CANCEL_WAIT_SECONDS)
        except Exception as exc:
            log.warning("the writer's connection did not recover (%s); closing it", exc)
            self._drop_connection()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _transaction(
        self, requests: list[_Request]
    ) -> list[tuple[list[StoredEvent], bool] | SsehubError]:
        rows = [(n, r, item) for n, r in enumerate(requests) for item in r.items]
        names = {r.channel: lookup_name(r.channel) for r in requests}  # once each, not per row
        conn = await self._connection()
        statuses = await conn.fetch(
            _PUBLISH,
            [r.user_id for _, r, _ in rows],
            [r.key_id for _, r, _ in rows],
            [names[r.channel] for _, r, _ in rows],
            [item.type for _, _, item in rows],
            [item.data for _, _, item in rows],
            [r.idempotency_key for _, r, _ in rows],
            [n for n, _, _ in rows],
            _LOCK_WAIT_MS,
            timeout=WRITE_TIMEOUT_SECONDS,
        )
        results = []
        at = 0
        for request in requests:
            mine = statuses[at : at + len(request.items)]
            at += len(request.items)
            results.append(_result(request, mine))
        created = [
            event
            for result, request in zip(results, requests, strict=True)
            if isinstance(result, tuple) and result[1]
            for event in result[0]
        ]
        self._metrics.events_published.inc(len(created))
        if created:
            created.sort(key=lambda event: event.id)
            head = next(row["tx_prev"] for row in statuses if row["status"] == "created")
            self.on_commit(created, head)
        return results


def _result(request: _Request, rows: list[Any]) -> tuple[list[StoredEvent], bool] | SsehubError:
    """What one request gets from its rows: its events, the event stored
    earlier under its idempotency key, or the error its status names."""
    status = rows[0]["status"]
    if status == "created":
        events = [
            StoredEvent(
                row["event_id"],
                row["event_channel_id"],
                request.channel,
                item.type,
                item.data,
                row["event_published_at"],
            )
            for row, item in zip(rows, request.items, strict=True)
        ]
        return events, True
    if status == "duplicate":  # what the key was first used for: one event, or a batch's
        row = rows[0]
        events = [
            StoredEvent(
                row["event_id"] + n,
                row["event_channel_id"],
                request.channel,
                type_,
                data,
                row["event_published_at"],
            )
            for n, (type_, data) in enumerate(
                zip(row["first_types"], row["first_datas"], strict=True)
            )
        ]
        return events, False
    if status == "unauthorized":
        return Unauthorized("User no longer exists" if request.user_id else "Invalid API key")
    if status == "forbidden":
        return Forbidden("Admin only")
    return NotFound(f"Channel {request.channel!r} not found")


def _rolled_back(exc: BaseException) -> bool:
    """An error the server reported for the statement that certainly means it did
    not commit: not a connection failure (class 08), not the server going away or
    a cancel that may have come after the commit, not a timeout or a lost socket
    (which are not ``PostgresError`` at all)."""
    if not isinstance(exc, asyncpg.PostgresError) or isinstance(
        exc, asyncpg.PostgresConnectionError
    ):
        return False
    state = getattr(exc, "sqlstate", "") or ""
    return not (state.startswith("08") or state in _OUTCOME_UNKNOWN_STATES)


def _lock_busy(exc: BaseException) -> bool:
    """The statement waited ``LOCK_WAIT_SECONDS`` for the publish lock and rolled back."""
    return getattr(exc, "sqlstate", None) == _LOCK_NOT_AVAILABLE


def _settle(request: _Request, outcome: tuple[list[StoredEvent], bool] | BaseException) -> None:
    if request.done.done():
        return
    if isinstance(outcome, BaseException):
        request.done.set_exception(outcome)
    else:
        request.done.set_result(outcome)
