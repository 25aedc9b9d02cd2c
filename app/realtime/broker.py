"""Brokers: how live events reach an instance's hub. One small interface, two engines.

Shaped like Mercure's ``Transport`` and Centrifugo's ``Broker``: the hub talks
to one ``Broker``, each engine is one module, and the choice is made once at
start-up from ``SSEHUB_BROKER`` (``app.runtime``).

- ``SSEHUB_BROKER=postgres`` (``PostgresBroker``, here) reads every event
  from the log;
- ``SSEHUB_BROKER=nats`` (``app.realtime.nats_broker``) receives over NATS
  only the events of the channels its streams carry.

Either way Postgres stays the source of truth and the ordering authority,
and the broker hands the hub (its ``Sink``) events in increasing id order
with no gap. The hub tells the broker which channels it carries
(``follow``/``unfollow``, when a channel gains its first stream or loses
its last); the broker says whether it is delivering (``health``, which
``/readyz`` reports).

**Who owns the position.** ``Sink.position``, "every id up to here has been
handed to the hub", is the hub's, and only ``Sink.deliver`` moves it: a
broker says how far it has delivered (``through``, which may pass ids of
channels nobody here carries) and keeps no position of its own. Why the
hub's: a stream registers with the hub and takes the hub's position as its
start in one synchronous step, and ``deliver`` fans out and moves the
position in one synchronous step too, so every event above a new stream's
start is either fanned out to it or read by its replay. A second copy in
the broker could only disagree with the one the streams read.

**PostgresBroker.** ``ssehub_events`` notifications are only wake-ups. On
each, the broker reads the log past the hub's position
(``app.events.log.read_page``) and hands the events to the hub, in id order;
notifications that arrive meanwhile are coalesced into the next read. It
reads on the listener's connection (``LogTail``, driven by
``app.realtime.listener``): live delivery never waits behind a reconnect
storm's queries on the pool. Because ids become visible in increasing order
(``app.events.publisher``), "past my position" never misses an event, so
when the connection is lost the listener simply reconnects and the tail is
read again: whatever was published meanwhile is delivered, in order. The
listener's turn every couple of seconds also catches a notification lost
any other way. It reads the whole tail, so ``follow`` and ``unfollow`` do
nothing.

**Gaps.** Retention may remove events before the broker reads them (a burst
on a channel keeping few events). Each page says which channels were pruned
past the broker's position, from the same snapshot as its events, and the hub
makes the streams that may have missed something catch up from the log, where
the replay sends ``ssehub.truncated`` (``Hub.mark_gap``).

**The committer's shortcut.** The instance whose writer committed a
transaction already holds its events, and knows (from the publish lock) that
every id up to ``tx_prev``, the log's head when the transaction appended, is
committed. If the hub's position is exactly ``tx_prev`` and the broker is not
in the middle of a read, nothing can come between: the events go to the hub at
once (``committed``), without waiting for the NOTIFY and reading them back.
Otherwise the NOTIFY path delivers them as usual.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.db import raw_connection
from app.events.log import Gap, StoredEvent, last_event_id, read_page
from app.metrics import Metrics

# A check not done for this long means this instance cannot deliver (or
# publish) now: it leaves its load balancer. The database's queries time out
# well before (``app.db.QUERY_TIMEOUT_SECONDS``) and retry.
STUCK_SECONDS = 5.0

BetweenPages = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Health:
    """Whether the broker delivers now, and if not, why (for the log and operators)."""

    ok: bool
    detail: str


class Sink(Protocol):
    """Where a broker hands live events: the hub."""

    @property
    def position(self) -> int:
        """Every id up to here has been handed over (see the module docstring)."""
        ...

    def deliver(self, events: list[StoredEvent], through: int) -> None:
        """``events`` (in id order, those of carried channels) and every other
        id up to ``through`` are handed over."""

    def mark_gap(self, gap: Gap) -> None: ...

    def carries_any(self) -> bool: ...

    def carries(self, channel_id: int) -> bool: ...

    def carried_channels(self) -> list[int]: ...


class Follower(Protocol):
    """What the hub tells its broker: which channels its streams carry."""

    def follow(self, channel_id: int) -> None:
        """The channel gained its first stream here."""

    def unfollow(self, channel_id: int) -> None:
        """The channel lost its last stream here."""


class LogTail(Protocol):
    """What the listener's loop drives on its connection (``app.realtime.listener``):
    read the log's tail, woken by ``ssehub_events`` and every turn."""

    async def catch_up(self, conn: Any, between_pages: BetweenPages) -> None:
        """Make sure nothing committed is left behind, calling ``between_pages``
        before each page read."""


class Broker(Follower, Protocol):
    """One engine: started with the hub, run as a background task, stopped."""

    async def start(self, sink: Sink) -> None:
        """Connect, and take the log's head as where delivery starts. The sink is
        given here, not to the constructor, because the hub is built with its
        broker (as Centrifugo's node hands its broker the event handler at
        ``Run``)."""

    async def run(self) -> None:
        """The engine's background work, until cancelled."""

    async def stop(self) -> None: ...

    def committed(self, events: list[StoredEvent], tx_prev: int) -> None:
        """This instance's writer committed ``events`` (in id order), right after
        ``tx_prev``, the log's head when it held the publish lock."""

    def health(self) -> Health: ...

    def log_tail(self) -> LogTail | None:
        """What the listener must drive on its connection, if anything."""


class PostgresBroker:
    def __init__(self, pool: Any, metrics: Metrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._sink: Sink | None = None
        self._reading = False
        self._read_at: float | None = None  # the last page, or turn, of the tail

    async def start(self, sink: Sink) -> None:
        async with raw_connection(self._pool) as conn:
            sink.deliver([], await last_event_id(conn))
        self._sink = sink

    async def run(self) -> None:
        return None  # the listener drives it

    async def stop(self) -> None:
        return None

    def follow(self, channel_id: int) -> None:
        return None  # every event is read

    def unfollow(self, channel_id: int) -> None:
        return None

    def log_tail(self) -> LogTail:
        return self

    def health(self) -> Health:
        """Delivering while the listener reads the tail: it turns at least every
        couple of seconds while connected, and before every page."""
        if self._read_at is None:
            return Health(False, "the listener has not read the log yet")
        late = time.monotonic() - self._read_at
        if late >= STUCK_SECONDS:
            return Health(False, f"the listener has not read the log for {late:.0f} s")
        return Health(True, "the listener reads the log")

    def committed(self, events: list[StoredEvent], tx_prev: int) -> None:
        """Hand them to the hub now if nothing can come between (module docstring)."""
        sink = self._sink
        if sink is None or self._reading or sink.position != tx_prev or not events:
            return
        self._metrics.broker_events.labels("commit").inc(len(events))
        sink.deliver(events, events[-1].id)

    async def catch_up(self, conn: Any, between_pages: BetweenPages) -> None:
        """Read the tail page by page until it is read to the end."""
        sink = self._sink
        assert sink is not None, "started before the listener runs"
        while True:
            await between_pages(conn)
            self._read_at = time.monotonic()
            if not sink.carries_any() and await self._skip_ahead(conn, sink):
                return
            self._reading = True
            try:
                page = await read_page(conn, None, sink.position)
            finally:
                self._reading = False
            for gap in page.gaps:
                sink.mark_gap(gap)
            if page.events:
                self._metrics.broker_events.labels("log").inc(len(page.events))
                sink.deliver(page.events, page.events[-1].id)
            if not page.more:
                return

    async def _skip_ahead(self, conn: Any, sink: Sink) -> bool:
        """With no stream to fan out to, move past what is committed instead of
        reading every row (new streams start at the hub's position). False if a
        stream appeared meanwhile: then the tail is read as usual."""
        top = await last_event_id(conn)
        if sink.carries_any():
            return False
        sink.deliver([], top)
        return True
