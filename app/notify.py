"""The Postgres NOTIFY channels that tie instances together.

``ssehub_events`` carries the highest id of each committed publish
transaction (sent by ``app.events.publisher`` inside that transaction); the
broker of every instance then reads the log's tail past its position.

``ssehub_control`` carries changes that open streams must react to on every
instance, as JSON sent inside the transaction that makes the change, so it is
delivered exactly when (and only if) the change commits:

=====================  =====================================================
``op``                 other fields; what streams do
=====================  =====================================================
``channel_deleted``    ``channel_id``, ``channel``: drop it, ``ssehub.channel_removed``
``access_changed``     ``channel_id``, ``channel``: re-check who may read it
                       (a member removed, or a channel made private)
``subscribed``         ``user_id``, ``channel_id``, ``channel``: ``/stream`` adds it
``unsubscribed``       ``user_id``, ``channel_id``, ``channel``: ``/stream`` drops it
``user_changed``       ``user_id``: promoted, demoted or deleted; cached rights
                       are forgotten, open streams re-checked
``api_key_revoked``    ``key_id``: the key is refused from now on
=====================  =====================================================

Every instance applies each message through its ``ControlHandler``s (the open
streams, ``app.realtime.control``; the publish rights, ``app.events.rights``).
A message sent while an instance's listener was disconnected is lost to it, so
after every reconnect each handler ``resync``s: it re-reads from the database
what the messages would have told it.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

EVENTS_CHANNEL = "ssehub_events"
CONTROL_CHANNEL = "ssehub_control"
INBOX_CHANNEL = "ssehub_inbox"  # ssehub_enqueue committed rows (app.events.inbox)

ControlOp = Literal[
    "channel_deleted",
    "access_changed",
    "subscribed",
    "unsubscribed",
    "user_changed",
    "api_key_revoked",
]


class ControlHandler(Protocol):
    """Something an instance keeps that control messages change."""

    async def apply(self, conn: Any, message: dict[str, Any]) -> None:
        """Apply one message; ``conn`` is the broker's connection, for what it must read."""

    async def resync(self, conn: Any) -> None:
        """Messages may have been lost: rebuild from the database."""


def control_payload(op: ControlOp, **fields: Any) -> str:
    return orjson.dumps({"op": op, **fields}).decode()


async def notify_control(session: AsyncSession, op: ControlOp, **fields: Any) -> None:
    """Queue a control message; Postgres delivers it when ``session`` commits."""
    await session.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": CONTROL_CHANNEL, "payload": control_payload(op, **fields)},
    )


async def notify_control_raw(conn: Any, op: ControlOp, **fields: Any) -> None:
    """``notify_control`` on a bare asyncpg connection (delivered at its commit)."""
    await conn.execute("SELECT pg_notify($1, $2)", CONTROL_CHANNEL, control_payload(op, **fields))
