"""Publishing from the application's own transaction: moving ``ssehub_enqueue``'s rows.

``ssehub_enqueue`` (``app/events/sql``) runs in the application's
transaction: it validates, writes one row to ``ssehub_inbox`` tagged with that
transaction's id, and notifies ``ssehub_inbox``, which Postgres delivers only
if the transaction commits. It takes no lock anybody else waits for, so a
transaction that enqueues and then stays open for minutes delays no publisher.

Every instance's writer moves committed rows into the log with
``ssehub_move_inbox()``, when the broker hears ``ssehub_inbox`` and every
couple of seconds besides (``Publisher.inbox_due``). One move takes at most
``MOVE_ROWS`` rows; the writer runs the API's waiting publishes between two
moves, so a backfill of any size delays them by one move at most.

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

from app.events.log import StoredEvent

log = logging.getLogger("ssehub")

MOVE_ROWS = 1000  # rows per move at most; a transaction of at most this many is adjacent
# Named with its schema and typed: an overload someone else defined cannot be
# picked for arguments of unknown type.
_MOVE = "SELECT * FROM public.ssehub_move_inbox($1::integer, $2::integer)"


@dataclass(frozen=True, slots=True)
class Moved:
    """What one move did: how many events it appended, and whether rows are left."""

    appended: int
    more: bool


async def move(
    conn: Any,
    committed: Callable[[list[StoredEvent], int], None] | None,
    lock_wait_ms: int,
    rows: int = MOVE_ROWS,
) -> Moved:
    """One move of committed inbox rows into the log; its events go to
    ``committed`` (with the log's head before them), as an HTTP publish's do.
    ``conn`` is the writer's, whose every statement has a timeout."""
    result = await conn.fetch(_MOVE, rows, lock_wait_ms)
    if not result:
        return Moved(0, False)
    head, moved = result[0], result[1:]
    if head["moved_stalled"] is not None:
        log.error(
            "an enqueueing transaction's events could not be moved: %s (set aside, tried again later)",
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
    return Moved(len(events), bool(head["moved_more"]))
