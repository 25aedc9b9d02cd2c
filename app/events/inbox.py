"""Publishing from the application's own transaction: moving ``ssehub_enqueue``'s rows.

``ssehub_enqueue`` (migration 0004) runs in the application's transaction:
it validates, writes one row to ``ssehub_inbox`` tagged with that
transaction's id, and notifies ``ssehub_inbox``, which Postgres delivers only
if the transaction commits. It takes no lock anybody else waits for, so a
transaction that enqueues and then stays open for minutes delays no publisher.

Every instance's writer moves committed rows into the log with
``ssehub_move_inbox()``, when the broker hears ``ssehub_inbox`` and every
couple of seconds besides (``Publisher.inbox_due``).

**Why no event is lost, duplicated or reordered, even when instances crash
mid-move:**

- *Only committed rows move, all of a transaction's at once.* A row is
  visible to the mover only after its transaction committed, and then all of
  that transaction's rows are; the mover takes whole transactions. A rolled
  back transaction's rows never become visible: nothing is published.
- *Exactly once.* One statement deletes the rows from the inbox and inserts
  their events, in the mover's one transaction: both commit or neither does.
  A mover that crashes, loses its connection or times out leaves the rows
  where they were (or, if its commit got through, gone with their events
  stored), and the next move, on any instance, takes what is left. Two movers
  never take the same row: they serialise on the publish lock, and each
  reads the inbox in a snapshot taken after it holds the lock.
- *In order, adjacent.* The move holds the publish lock while it draws ids
  (the argument of ``app.events.publisher``), so its events become visible
  in id order like any other publish. A transaction's rows get consecutive
  ids in the order of its calls (inbox ids), transactions in the order of
  their first call.
- *Idempotency keys* are honoured as for HTTP publishes: a row whose key was
  used on its channel in the last 24 hours is dropped by the move.
- A row for a channel deleted since it was enqueued is dropped by the move.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.events.log import StoredEvent

MOVE_ROWS = 1000  # about this many rows per move (whole transactions, at least one)
_MOVE = "SELECT * FROM ssehub_move_inbox($1)"
_SET_LIMIT = (
    "INSERT INTO ssehub_config (name, value) VALUES ('max_event_bytes', $1) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


async def move(conn: Any, committed: Callable[[list[StoredEvent], int], None] | None) -> int:
    """Move committed inbox rows into the log until none are left; returns how many
    events were appended. Each move's events go to ``committed`` (with the log's
    head before them), as an HTTP publish's do. ``conn`` is the writer's, whose
    every statement has a timeout."""
    appended = 0
    while True:
        rows = await conn.fetch(_MOVE, MOVE_ROWS)
        events = [
            StoredEvent(
                r["moved_id"],
                r["moved_channel_id"],
                r["moved_channel"],
                r["moved_type"],
                r["moved_data"],
                r["moved_published_at"],
            )
            for r in rows[1:]
        ]
        if events:
            appended += len(events)
            if committed is not None:
                committed(events, rows[1]["moved_tx_prev"])
        if not rows or rows[0]["moved_taken"] < MOVE_ROWS:
            return appended


async def publish_limits(conn: Any, max_event_bytes: int) -> None:
    """Tell ``ssehub_enqueue`` the size limit this instance enforces for the API."""
    await conn.execute(_SET_LIMIT, str(max_event_bytes))
