"""The broker: one LISTEN connection per instance, and the tail of the event log.

``ssehub_events`` notifications are only wake-ups. On each, one reader reads
the log past the broker's position (``app.events.log.tail``) and hands the
events to the hub, in id order; notifications that arrive meanwhile are
coalesced into the next read. Because ids become visible in increasing order
(``app.events.publisher``), "past my position" never misses an event, so when
the LISTEN connection is lost the broker simply reconnects and reads the tail
again: whatever was published while it was away is delivered, in order. A
slow periodic read is a safety net for a notification lost any other way.

``ssehub_control`` messages (``app.notify``) change what open streams carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
import orjson

from app.db import asyncpg_dsn, raw_connection
from app.events.log import last_event_id, tail
from app.notify import CONTROL_CHANNEL, EVENTS_CHANNEL
from app.realtime.hub import Hub

log = logging.getLogger("ssehub")

TAIL_PAGE = 1000
HEALTH_CHECK_SECONDS = 2.0
SAFETY_READ_SECONDS = 5.0
LISTENER_NAME = "ssehub-listener"


class Broker:
    def __init__(self, database_url: str, pool: Any, hub: Hub) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._pool = pool
        self._hub = hub
        self._dirty = asyncio.Event()
        self._lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._control: list[dict[str, Any]] = []
        self.listening = False
        self.position = 0

    async def start(self) -> None:
        async with raw_connection(self._pool) as conn:
            self.position = await last_event_id(conn)
        self._hub.position = self.position
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="broker-listen"),
            asyncio.create_task(self._read_forever(), name="broker-read"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the LISTEN connection ------------------------------------------------

    async def _listen_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._listen_once()
                backoff = 0.1
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("broker: listener connection failed (%s); retrying", exc)
            self.listening = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _listen_once(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, server_settings={"application_name": LISTENER_NAME}, timeout=5
        )
        self._lost.clear()
        try:
            conn.add_termination_listener(lambda _conn: self._lost.set())
            await conn.add_listener(EVENTS_CHANNEL, self._on_events)
            await conn.add_listener(CONTROL_CHANNEL, self._on_control)
            self.listening = True
            log.info("broker: listening")
            self._dirty.set()  # read whatever was published while we were away
            while not self._lost.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), HEALTH_CHECK_SECONDS)
                if not self._lost.is_set():
                    await conn.fetchval("SELECT 1", timeout=HEALTH_CHECK_SECONDS)
        finally:
            self.listening = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1)
            conn.terminate()
        log.warning("broker: listener connection lost")

    def _on_events(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._dirty.set()

    def _on_control(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        # Control messages may need the database (access checks): handle them in
        # order, after the events committed before them have been read.
        self._control.append(orjson.loads(payload))
        self._dirty.set()

    # -- reading the tail -----------------------------------------------------

    async def _read_forever(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), SAFETY_READ_SECONDS)
            self._dirty.clear()
            try:
                await self._read_tail()
                await self._apply_control()
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("broker: reading the event log failed (%s); retrying", exc)
                await asyncio.sleep(0.2)
                self._dirty.set()

    async def _read_tail(self) -> None:
        async with raw_connection(self._pool) as conn:
            if not self._hub.carries_any():
                # No stream to fan out to: just move past what is committed (new
                # streams start at ``hub.position``) instead of reading every row.
                self.position = max(self.position, await last_event_id(conn))
                self._hub.position = max(self._hub.position, self.position)
                return
            while True:
                events = await tail(conn, self.position, TAIL_PAGE)
                if not events:
                    return
                self._hub.fan_out(events)
                self.position = events[-1].id
                if len(events) < TAIL_PAGE:
                    return

    async def _apply_control(self) -> None:
        while self._control:
            message = self._control.pop(0)
            try:
                await self._apply(message)
            except (KeyError, TypeError, ValueError) as exc:
                # Only our own transactions send these; a bad one must not stop live delivery.
                log.error("broker: ignoring malformed control message %r (%s)", message, exc)

    async def _apply(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        channel_id = int(message["channel_id"])
        name = str(message["channel"])
        if op == "channel_deleted":
            self._hub.revoke(self._hub.subscribers_of(channel_id), channel_id, name)
        elif op == "access_changed":
            await self._recheck_access(channel_id, name)
        elif op == "subscribed":
            self._hub.add_channel(int(message["user_id"]), channel_id, name)
        elif op == "unsubscribed":
            self._hub.drop_channel(int(message["user_id"]), channel_id)

    async def _recheck_access(self, channel_id: int, name: str) -> None:
        """Stop carrying the channel on streams whose user may no longer read it."""
        subscribers = [s for s in self._hub.subscribers_of(channel_id) if not s.is_admin]
        if not subscribers:
            return
        async with raw_connection(self._pool) as conn:
            private = await conn.fetchval("SELECT private FROM channels WHERE id = $1", channel_id)
            members = {
                r[0]
                for r in await conn.fetch(
                    "SELECT user_id FROM channel_members WHERE channel_id = $1", channel_id
                )
            }
        if private is None or private:
            lost = [s for s in subscribers if s.user_id not in members]
            self._hub.revoke(lost, channel_id, name)
