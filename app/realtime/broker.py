"""The broker: one connection per instance, to LISTEN and to read the log's tail.

``ssehub_events`` notifications are only wake-ups. On each, the broker reads
the log past its position (``app.events.log.read_page``) and hands the
events to the hub, in id order; notifications that arrive meanwhile are
coalesced into the next read. Because ids become visible in increasing order
(``app.events.publisher``), "past my position" never misses an event, so when
the connection is lost the broker simply reconnects and reads the tail again:
whatever was published while it was away is delivered, in order. A read every
``HEALTH_CHECK_SECONDS`` also checks the connection, and catches a
notification lost any other way.

**Gaps.** Retention may remove events before the broker reads them (a burst
on a channel keeping few events). Each page says which channels were pruned
past the broker's position, from the same snapshot as its events, and the
hub makes the streams that may have missed something catch up from the log,
where the replay sends ``ssehub.truncated`` (``Hub.mark_gap``).

**Control messages** (``ssehub_control``, ``app.notify``) are applied through
the instance's ``ControlHandler``s before each page of the tail, so a
revocation waits for at most one page, not for a whole backlog. A message is
removed from the queue only once every handler has applied it; if applying
fails on the database, the connection is dropped, and whatever was queued
is covered by what follows every (re)connection: each handler ``resync``s from
the database, because messages sent while the listener was away are lost.

**The committer's shortcut.** The instance whose writer committed a
transaction already holds its events, and knows (from the publish lock) that
every id up to ``tx_prev``, the log's head when the transaction appended, is
committed. If this broker has delivered exactly up to ``tx_prev`` and is not
in the middle of a read, nothing can come between: the events go to the hub
at once (``committed``), without waiting for the NOTIFY and reading them back.
Otherwise the NOTIFY path delivers them as usual.

**Everything is bounded in time**: the connection opens within 5 s, every
query has a timeout, and ``alive_at`` records the loop's last turn, so
``/readyz`` fails when the loop is stuck as well as when it is disconnected.

The tail and the control reads run on this connection, not the pool's: live
delivery never waits behind a reconnect storm's queries. It is
``SSEHUB_LISTEN_DATABASE_URL``'s when set (a direct connection where the
others go through PgBouncer, whose transaction mode cannot LISTEN).

It also hears ``ssehub_inbox`` (rows enqueued from SQL, ``app.events.inbox``)
and hands it to the writer (``on_inbox``), once per turn besides: a safety net
for a notification it missed while disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import orjson

from app.db import QUERY_TIMEOUT_SECONDS, asyncpg_dsn, connection_options, raw_connection
from app.events.log import StoredEvent, last_event_id, read_page
from app.notify import CONTROL_CHANNEL, EVENTS_CHANNEL, INBOX_CHANNEL, ControlHandler
from app.realtime.hub import Hub

log = logging.getLogger("ssehub")

HEALTH_CHECK_SECONDS = 2.0
LISTENER_NAME = "ssehub-listener"


class Broker:
    def __init__(
        self,
        database_url: str,
        hub: Hub,
        handlers: Sequence[ControlHandler],
        on_inbox: Callable[[], None],
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._hub = hub
        self._handlers = list(handlers)
        self._on_inbox = on_inbox
        self._dirty = asyncio.Event()
        self._lost = asyncio.Event()
        self._control: deque[dict[str, Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.listening = False
        self.position = 0
        self.alive_at = time.monotonic()
        self._reading = False

    def committed(self, events: list[StoredEvent], tx_prev: int) -> None:
        """This instance committed ``events`` (in id order) right after ``tx_prev``:
        hand them to the hub now if nothing can come between (module docstring)."""
        if self._reading or self.position != tx_prev or not events:
            return
        self._hub.fan_out(events)
        self.position = events[-1].id

    async def start(self, pool: Any) -> None:
        async with raw_connection(pool) as conn:
            self.position = await last_event_id(conn)
        self._hub.position = self.position
        self.alive_at = time.monotonic()
        self._task = asyncio.create_task(self._run_forever(), name="broker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def stuck_for(self, now: float) -> float:
        """How long since the loop last turned: it turns at least every
        ``HEALTH_CHECK_SECONDS`` (and every page) while connected."""
        return now - self.alive_at

    async def _run_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._session()
                backoff = 0.1
            except Exception as exc:  # anything: live delivery must go on
                log.warning("broker: connection failed (%s: %s); retrying", type(exc).__name__, exc)
            self.listening = False
            self.alive_at = time.monotonic()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _session(self) -> None:
        """One connection's life: listen, resync, then follow the tail until it is lost."""
        options = connection_options(LISTENER_NAME, QUERY_TIMEOUT_SECONDS, pgbouncer=False)
        conn = await asyncpg.connect(self._dsn, **options)
        self._lost.clear()
        try:
            conn.add_termination_listener(lambda _conn: self._lost.set())
            self._control.clear()  # what they said, the resync below reads afresh
            await conn.add_listener(EVENTS_CHANNEL, self._on_events)
            await conn.add_listener(CONTROL_CHANNEL, self._on_control)
            await conn.add_listener(INBOX_CHANNEL, self._on_inbox_notified)
            for handler in self._handlers:
                await handler.resync(conn)
            self.listening = True
            log.info("broker: listening")
            while not self._lost.is_set():
                self.alive_at = time.monotonic()
                self._on_inbox()
                await self._catch_up(conn)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), HEALTH_CHECK_SECONDS)
                self._dirty.clear()
        finally:
            self.listening = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1)
            conn.terminate()
        log.warning("broker: listener connection lost")

    def _on_events(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._dirty.set()

    def _on_inbox_notified(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._on_inbox()

    def _on_control(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.error("broker: ignoring a control message that is not JSON: %r", payload[:200])
            return
        self._control.append(message)
        self._dirty.set()

    async def _catch_up(self, conn: Any) -> None:
        """Apply pending control messages, then read the tail page by page (control
        messages again before each page) until it is read to the end."""
        while True:
            await self._apply_control(conn)
            self.alive_at = time.monotonic()
            if not self._hub.carries_any() and await self._skip_ahead(conn):
                return
            self._reading = True
            try:
                page = await read_page(conn, None, self.position)
            finally:
                self._reading = False
            for gap in page.gaps:
                self._hub.mark_gap(gap)
            if page.events:
                self._hub.fan_out(page.events)
                self.position = page.events[-1].id
            if not page.more:
                return

    async def _skip_ahead(self, conn: Any) -> bool:
        """With no stream to fan out to, move past what is committed instead of
        reading every row (new streams start at ``hub.position``). False if a
        stream appeared meanwhile: then the tail is read as usual."""
        top = await last_event_id(conn)
        if self._hub.carries_any():
            return False
        self.position = max(self.position, top)
        self._hub.position = max(self._hub.position, self.position)
        return True

    async def _apply_control(self, conn: Any) -> None:
        """Each queued message through every handler, in order; removed only once
        applied. A database error propagates (the session ends and resyncs); a
        malformed message (only our own transactions send them) is dropped."""
        while self._control:
            message = self._control[0]
            try:
                for handler in self._handlers:
                    await handler.apply(conn, message)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("broker: ignoring malformed control message %r (%s)", message, exc)
            self._control.popleft()
