"""The listener: one Postgres connection per instance, for what must reach every instance.

It LISTENs to ``ssehub_control`` (``app.notify``: changes open streams must
react to), to ``ssehub_inbox`` (rows enqueued from SQL, handed to the writer:
``on_inbox``, also on every quiet turn, in case a notification was missed) and,
when the broker reads the log's tail here (``LogTail``, the Postgres broker's:
``app.realtime.broker``), to ``ssehub_events``. Every turn (on a
notification, and at least every ``HEALTH_CHECK_SECONDS``) it applies the
pending control messages, then lets the tail catch up, on this connection:
live delivery never waits behind a reconnect storm's queries on the pool. The
connection is ``SSEHUB_LISTEN_DATABASE_URL``'s when set (a direct connection
where the others go through PgBouncer, whose transaction mode cannot LISTEN).

**Control messages** are hints (``app.notify``): as they arrive they are
merged into one bounded ``Hints``, which is applied through the instance's
``ControlHandler``s before each page the broker reads, so a revocation waits
for at most one page, not for a whole backlog, and a flood of messages (forged
ones included: anyone may ``NOTIFY``) costs one re-check per turn, not one per
message. A message that is not one ssehub sends is dropped without a turn,
and counted in one log line every ``IGNORED_LOG_SECONDS`` at most. If
applying fails on the database, the connection is dropped, and whatever was
pending is covered by what starts every (re)connection:
``Hints(everything=True)``, because messages sent while the listener was away
are lost.

**Everything is bounded in time**: the connection opens within 5 s, every
query has a timeout, and ``alive_at`` records the loop's last turn, so
``/readyz`` fails when the loop is stuck as well as when it is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import orjson

from app.db import QUERY_TIMEOUT_SECONDS, asyncpg_dsn, connection_options
from app.notify import CONTROL_CHANNEL, EVENTS_CHANNEL, INBOX_CHANNEL, ControlHandler, Hints
from app.realtime.broker import LogTail

log = logging.getLogger("ssehub")

HEALTH_CHECK_SECONDS = 2.0
LISTENER_NAME = "ssehub-listener"
IGNORED_LOG_SECONDS = 10.0  # one log line at most this often for messages ignored meanwhile


class Listener:
    def __init__(
        self,
        database_url: str,
        tail: LogTail | None,
        handlers: Sequence[ControlHandler],
        on_inbox: Callable[[], None],
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._tail = tail
        self._handlers = list(handlers)
        self._on_inbox = on_inbox
        self._dirty = asyncio.Event()
        self._lost = asyncio.Event()
        self._hints = Hints()  # what the next turn applies
        self._ignored = 0  # control messages ssehub does not send, not logged yet
        self._ignored_told_at = -IGNORED_LOG_SECONDS
        self.listening = False
        self.alive_at = time.monotonic()

    def stuck_for(self, now: float) -> float:
        """How long since the loop last turned: it turns at least every
        ``HEALTH_CHECK_SECONDS`` (and every page) while connected."""
        return now - self.alive_at

    async def run(self) -> None:
        """Listen, reconnecting for ever, until cancelled."""
        self.alive_at = time.monotonic()
        backoff = 0.1
        while True:
            try:
                await self._session()
                backoff = 0.1
            except Exception as exc:  # anything: live delivery must go on
                log.warning(
                    "listener: connection failed (%s: %s); retrying", type(exc).__name__, exc
                )
            self.listening = False
            self.alive_at = time.monotonic()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _session(self) -> None:
        """One connection's life: listen, read everything again, then turn until it is lost."""
        options = connection_options(LISTENER_NAME, QUERY_TIMEOUT_SECONDS, pgbouncer=False)
        conn = await asyncpg.connect(self._dsn, **options)
        self._lost.clear()
        try:
            conn.add_termination_listener(lambda _conn: self._lose())
            self._hints = Hints(everything=True)  # what was lost: all of it, read afresh
            if self._tail is not None:
                await conn.add_listener(EVENTS_CHANNEL, self._on_events)
            await conn.add_listener(CONTROL_CHANNEL, self._on_control)
            await conn.add_listener(INBOX_CHANNEL, self._on_inbox_notified)
            await self._apply_control(conn)
            self.listening = True
            log.info("listener: listening")
            quiet = True  # the first turn, and every turn no notification started
            while not self._lost.is_set():
                self.alive_at = time.monotonic()
                if quiet:
                    self._on_inbox()  # a safety net, not a query per event's wake-up
                await self._apply_control(conn)
                if self._tail is not None:
                    await self._tail.catch_up(conn, self._between_pages)
                quiet = False
                try:
                    await asyncio.wait_for(self._dirty.wait(), HEALTH_CHECK_SECONDS)
                except TimeoutError:
                    quiet = True
                self._dirty.clear()
        finally:
            self.listening = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1)
            conn.terminate()
        log.warning("listener: connection lost")

    def _lose(self) -> None:
        """The connection is gone: end the session now, not at the turn's next
        health check, so ``listening`` (and ``/readyz``) says so at once."""
        self._lost.set()
        self._dirty.set()

    async def _between_pages(self, conn: Any) -> None:
        """Before each page the tail reads: the loop is alive, control applied."""
        self.alive_at = time.monotonic()
        await self._apply_control(conn)

    def _on_events(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._dirty.set()

    def _on_inbox_notified(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._on_inbox()

    def recheck_streams_of(self, user_id: int) -> None:
        """Have the next turn read again what ``user_id``'s open streams may carry."""
        self._hints.recheck_streams_of(user_id)
        self._dirty.set()

    def _on_control(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            merged = self._hints.add(orjson.loads(payload))
        except orjson.JSONDecodeError:
            merged = False
        if merged:
            self._dirty.set()
        else:  # nothing to do: not even a turn
            self._ignored += 1

    async def _apply_control(self, conn: Any) -> None:
        """What the messages since the last turn hint at, through every handler.
        A database error propagates: the session ends, and the next one starts
        with everything."""
        now = time.monotonic()
        if self._ignored and now - self._ignored_told_at >= IGNORED_LOG_SECONDS:
            log.warning("listener: ignored %d control messages ssehub does not send", self._ignored)
            self._ignored, self._ignored_told_at = 0, now
        if not self._hints:
            return
        hints, self._hints = self._hints, Hints()
        for handler in self._handlers:
            await handler.apply(conn, hints)
