"""Brokers: how live events reach an instance's hub. One small interface, two engines.

``SSEHUB_BROKER=postgres`` (``PostgresBroker``, here) reads every event from
the log; ``SSEHUB_BROKER=nats`` (``app.realtime.nats_broker``) receives over
NATS only the events of the channels its streams carry. Either way Postgres
stays the source of truth and the ordering authority, the hub gets events in
increasing id order with no gap, and the listener (``app.realtime.listener``)
drives ``catch_up`` on its connection.

**PostgresBroker.** ``ssehub_events`` notifications are only wake-ups. On
each, the broker reads the log past its position (``app.events.log.read_page``)
and hands the events to the hub, in id order; notifications that arrive
meanwhile are coalesced into the next read. Because ids become visible in
increasing order (``app.events.publisher``), "past my position" never misses an
event, so when the connection is lost the listener simply reconnects and the
tail is read again: whatever was published meanwhile is delivered, in order.
The listener's turn every couple of seconds also catches a notification lost
any other way.

**Gaps.** Retention may remove events before the broker reads them (a burst
on a channel keeping few events). Each page says which channels were pruned
past the broker's position, from the same snapshot as its events, and the hub
makes the streams that may have missed something catch up from the log, where
the replay sends ``ssehub.truncated`` (``Hub.mark_gap``).

**The committer's shortcut.** The instance whose writer committed a
transaction already holds its events, and knows (from the publish lock) that
every id up to ``tx_prev``, the log's head when the transaction appended, is
committed. If the broker has delivered exactly up to ``tx_prev`` and is not in
the middle of a read, nothing can come between: the events go to the hub at
once (``committed``), without waiting for the NOTIFY and reading them back.
Otherwise the NOTIFY path delivers them as usual.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from app.db import raw_connection
from app.events.log import StoredEvent, last_event_id, read_page
from app.metrics import Metrics
from app.realtime.hub import Hub

BetweenPages = Callable[[Any], Awaitable[None]]


class Broker(Protocol):
    """What the hub and the listener need of a broker."""

    position: int  # every event up to here has been handed to the hub
    wants_notify: bool  # whether the listener should wake it on ``ssehub_events``

    async def start(self, pool: Any) -> None: ...

    async def stop(self) -> None: ...

    def committed(self, events: list[StoredEvent], tx_prev: int) -> None:
        """This instance's writer committed ``events`` (in id order), right after
        ``tx_prev``, the log's head when it held the publish lock."""

    async def catch_up(self, conn: Any, between_pages: BetweenPages) -> None:
        """On the listener's turn: make sure nothing committed is left behind."""


class PostgresBroker:
    wants_notify = True

    def __init__(self, hub: Hub, metrics: Metrics) -> None:
        self._hub = hub
        self._metrics = metrics
        self.position = 0
        self._reading = False

    async def start(self, pool: Any) -> None:
        async with raw_connection(pool) as conn:
            self.position = await last_event_id(conn)
        self._hub.position = self.position

    async def stop(self) -> None:
        return None

    def committed(self, events: list[StoredEvent], tx_prev: int) -> None:
        """Hand them to the hub now if nothing can come between (module docstring)."""
        if self._reading or self.position != tx_prev or not events:
            return
        self._metrics.broker_events.labels("commit").inc(len(events))
        self._hub.fan_out(events)
        self.position = events[-1].id

    async def catch_up(self, conn: Any, between_pages: BetweenPages) -> None:
        """Read the tail page by page until it is read to the end."""
        while True:
            await between_pages(conn)
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
                self._metrics.broker_events.labels("log").inc(len(page.events))
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
