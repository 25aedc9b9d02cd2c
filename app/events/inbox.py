"""Publishing from the application's own transaction: moving ``ssehub_enqueue``'s rows.

``ssehub_enqueue`` (``app/events/sql``) runs in the application's
transaction: it validates, writes one row to ``ssehub_inbox`` tagged with that
transaction's id (jsonb's text of the data: the move stores it as compact
JSON), and reads one flag. It takes no lock anybody else waits for, so a
transaction that enqueues and then stays open for minutes delays no publisher.

Every instance's writer moves committed rows into the log with
``ssehub_move_inbox()``. One move takes at most ``MOVE_ROWS`` rows; the writer
runs the API's waiting publishes between two moves, so a backfill of any size
delays them by one move at most.

**When a mover moves: polling while busy, a notification while asleep.** A
``NOTIFY`` from every enqueue would cost every enqueueing commit a lock that
all notifying commits wait for, one after the other. So a mover that is
*awake* polls the inbox every ``POLL_SECONDS`` (a query that finds it empty
costs no lock; ``BUSY_POLL_SECONDS`` after a move of ``BUSY_ROWS`` or more,
so a busy inbox is moved in fewer, larger moves) and says so: its moves clear the flag ``ssehub_inbox_asleep``,
and while the flag is clear ``ssehub_enqueue`` notifies nobody. After
``IDLE_POLLS`` empty polls in a row the mover *settles*: ``ssehub_inbox_sleep()``
sets the flag and returns a horizon, the next transaction id to be assigned;
the mover goes on polling, less and less often (up to ``SETTLE_MAX_SECONDS``),
until one poll sees, in one snapshot, every transaction below the horizon
ended and no movable row: then it is *asleep*, and moves again when
``ssehub_inbox`` is heard (the listener also wakes it every couple of seconds,
in case a notification was missed). A move that takes rows wakes it.

*Why no wake-up is lost.* ``ssehub_enqueue`` inserts its row (so its
transaction T has an id) and then, in the same statement, reads the flag. The
flag is a sequence: read and set outside any snapshot, so even in a
repeatable-read transaction T reads its present value. If T reads it set, T
notifies; the notification is delivered when T commits, and the mover that
hears it moves T's rows (a move of an asleep mover that takes rows wakes it).
If T reads it clear, the last one to set or clear it before T's read cleared
it, in a move of a mover M, which was awake then. M stays awake until it has
settled: it set the flag after T's read (else T would have read it set), took
its horizon after that, so above T's id, and polls until a snapshot shows T
ended; that same snapshot holds T's rows if T committed, and M moves them. A
mover that crashes while awake leaves the flag clear: another instance's
listener wakes its mover within a couple of seconds, and a mover that finds
the flag clear while it is asleep wakes up (so one will settle and set it
again); a mover starts awake.

What this costs: while awake, a poll every ``POLL_SECONDS`` per instance;
while settling, a transaction older than the horizon (anywhere in the
cluster) keeps the mover polling at ``SETTLE_MAX_SECONDS``, which is also
the longest an event of a transaction that read the flag clear just before
it was set waits after it commits; asleep, nothing.

**Why no event is lost, duplicated or reordered, even when instances crash
mid-move:**

- *Only committed rows move.* A row is visible to the mover only after its
  transaction committed. A rolled back transaction's rows never become
  visible: nothing is published.
- *Exactly once.* One statement deletes rows from the inbox and inserts their
  events, in the mover's one transaction: both commit or neither does. A
  mover that crashes, loses its connection or times out leaves the rows where
  they were (or, if its commit got through, gone with their events stored),
  and the next move, on any instance, takes what is left. Two movers never
  take the same row: they serialise on the publish lock, and each reads the
  inbox in snapshots taken after it holds the lock.
- *In order.* A move takes, in the order of their oldest remaining row,
  whole transactions while they fit in ``MOVE_ROWS``; a transaction first in
  line that does not fit gives its ``MOVE_ROWS`` oldest rows. Within the move
  the rows keep that order, and the move holds the publish lock while it draws
  ids (the argument of ``app.events.publisher``), so its events become visible
  in id order like any other publish. A transaction moved in several chunks
  keeps its order across them: each chunk is its oldest remaining rows, and a
  later chunk is taken by a later move, which draws higher ids. A transaction
  that started after another committed has only rows newer than all of the
  other's, so it is never moved ahead of any of them.
- *Adjacent, up to* ``MOVE_ROWS``. A transaction of at most ``MOVE_ROWS``
  rows is never split: one that does not fit behind others waits to be first
  in line, and then fits. Its events get consecutive ids in call order. A
  larger one's events are adjacent chunk by chunk; the API's publishes (and
  other transactions, when its next chunk's rows are not the oldest) may come
  between two chunks.
- *Nobody waits behind a transaction that cannot move.* If appending a
  transaction's rows fails for a reason in the rows (not a timeout, a lock
  wait or want of resources, which fail the whole move, to be tried again),
  the move sets that transaction aside in ``ssehub_inbox_stalled`` and the
  transactions behind it move on; it is tried again after 1 s, then after
  twice as long each time, up to 5 minutes, and its error is logged each time.
  It is then published after transactions that committed later: the one
  exception to the order above.
- *Idempotency keys* are honoured as for HTTP publishes: a row whose key was
  used on its channel in the last 24 hours is dropped by the move.
- A row for a channel deleted since it was enqueued is dropped by the move.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.events.log import StoredEvent

log = logging.getLogger("ssehub")

MOVE_ROWS = 1000  # rows per move at most; a transaction of at most this many is adjacent
POLL_SECONDS = 0.001  # awake: from one move to the next poll
# Awake and busy (the last move took at least BUSY_ROWS): fewer, larger moves,
# each costing the writer one round trip and the publish lock once.
BUSY_POLL_SECONDS = 0.005
BUSY_ROWS = 8
IDLE_POLLS = 20  # empty polls in a row before an awake mover settles
SETTLE_MAX_SECONDS = 0.05  # settling: polls back off up to this
VACUUM_ROWS = 5000  # rows a mover moves between two vacuums of the inbox
# Named with its schema and typed: an overload someone else defined cannot be
# picked for arguments of unknown type.
_MOVE = (
    "SELECT * FROM public.ssehub_move_inbox($1::integer, $2::integer, $3::boolean, $4::text::xid8)"
)
_SLEEP = "SELECT public.ssehub_inbox_sleep()::text"
# Another instance's vacuum of it is enough: this one does not wait for it. Nor
# does it cut off the table's empty tail: that needs a lock every enqueue
# conflicts with, and under load the vacuum would wait seconds for it, the move
# with it (the table also says so, for autovacuum: migration 0008).
_VACUUM = "VACUUM (SKIP_LOCKED, TRUNCATE false) public.ssehub_inbox"


@dataclass(frozen=True, slots=True)
class Moved:
    """What one move did: how many events it appended, and whether rows are left."""

    appended: int
    more: bool


class Mover:
    """One writer's side of the wake-up (see the module docstring): awake (polls,
    clears the flag), settling (polls until its horizon has passed) or asleep
    (moves when told). It starts awake, so a flag a crashed mover left clear is
    set again once this one settles."""

    def __init__(self) -> None:
        self._awake = True
        self._horizon: str | None = None  # settling: the xid8 every older transaction must pass
        self._empty_polls = 0
        self._settle_wait = POLL_SECONDS
        self._moved_since_vacuum = 0
        self._last_taken = 0

    @property
    def asleep(self) -> bool:
        return not self._awake and self._horizon is None

    def next_poll(self) -> float | None:
        """Seconds until the next poll, None while asleep."""
        if self._horizon is not None:
            return self._settle_wait
        if not self._awake:
            return None
        return BUSY_POLL_SECONDS if self._last_taken >= BUSY_ROWS else POLL_SECONDS

    async def move(
        self,
        conn: Any,
        committed: Callable[[list[StoredEvent], int], None] | None,
        lock_wait_ms: int,
        rows: int = MOVE_ROWS,
    ) -> Moved:
        """One move of committed inbox rows into the log; its events go to
        ``committed`` (with the log's head before them), as an HTTP publish's
        do. ``conn`` is the writer's, whose every statement has a timeout. A
        move that fails leaves the state as it was: awake stays awake."""
        awake = self._awake and self._horizon is None
        result = await conn.fetch(_MOVE, rows, lock_wait_ms, awake, self._horizon)
        head, moved = result[0], result[1:]
        if head["moved_stalled"] is not None:
            log.error(
                "an enqueueing transaction's events could not be moved: %s "
                "(set aside, tried again later)",
                head["moved_stalled"],
            )
        events = [
            StoredEvent(
                r["moved_id"],
                r["moved_channel_id"],
                r["moved_channel"],
                r["moved_type"],
                r["moved_data"],
                r["moved_published_at"],
            )
            for r in moved
        ]
        if events and committed is not None:
            committed(events, moved[0]["moved_tx_prev"])
        self._last_taken = head["moved_taken"]
        busy = head["moved_taken"] > 0 or head["moved_more"]
        await self._next_state(conn, busy, head["moved_may_sleep"])
        await self._tidy(conn, head["moved_taken"])
        return Moved(len(events), bool(head["moved_more"]))

    async def _tidy(self, conn: Any, taken: int) -> None:
        """Every row moved leaves a dead one, which every poll and every move
        scans past until a vacuum removes it; autovacuum comes by about once a
        minute, when a busy inbox has left hundreds of thousands."""
        self._moved_since_vacuum += taken
        if self._moved_since_vacuum >= VACUUM_ROWS:
            self._moved_since_vacuum = 0
            try:
                await conn.execute(_VACUUM)
            except asyncpg.PostgresError as exc:  # the move is done: only the tidying failed
                log.warning("vacuuming the inbox failed (%s: %s)", type(exc).__name__, exc)

    async def _next_state(self, conn: Any, busy: bool, may_sleep: bool) -> None:
        if busy:
            self._awake, self._horizon, self._empty_polls = True, None, 0
        elif may_sleep:
            self._awake, self._horizon = False, None
        elif self._horizon is not None:
            self._settle_wait = min(self._settle_wait * 2, SETTLE_MAX_SECONDS)
        elif not self._awake:
            self._awake, self._empty_polls = True, 0  # the flag is clear: join whoever cleared it
        else:
            self._empty_polls += 1
            if self._empty_polls >= IDLE_POLLS:
                await self.settle(conn)

    async def settle(self, conn: Any) -> None:
        """Set the flag (enqueues notify from now on) and poll until the horizon passes."""
        self._horizon = await conn.fetchval(_SLEEP)
        self._awake = False
        self._settle_wait = POLL_SECONDS
