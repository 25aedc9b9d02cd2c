"""The two Postgres NOTIFY channels that tie instances together.

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
=====================  =====================================================
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

EVENTS_CHANNEL = "ssehub_events"
CONTROL_CHANNEL = "ssehub_control"

ControlOp = Literal["channel_deleted", "access_changed", "subscribed", "unsubscribed"]


async def notify_control(session: AsyncSession, op: ControlOp, **fields: Any) -> None:
    """Queue a control message; Postgres delivers it when ``session`` commits."""
    payload = orjson.dumps({"op": op, **fields}).decode()
    await session.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": CONTROL_CHANNEL, "payload": payload},
    )
