"""The Postgres NOTIFY channels that tie instances together.

``ssehub_events`` carries the highest id of each committed publish
transaction (sent by ``app.events.publisher`` inside that transaction); the
broker of every instance then reads the log's tail past its position.

``ssehub_control`` carries changes that open streams and caches must react to
on every instance, as JSON sent inside the transaction that makes the change,
so it is delivered exactly when (and only if) the change commits:

=====================  =====================================================
``op``                 other fields; what may have changed
=====================  =====================================================
``channel_deleted``    ``channel_id``, ``channel``: who may read it (nobody)
``access_changed``     ``channel_id``, ``channel``: who may read it
                       (a member removed, or a channel made private)
``subscribed``         ``user_id``, ``channel_id``, ``channel``: what the
``unsubscribed``       user's ``/stream`` follows
``user_changed``       ``user_id``: promoted, demoted or deleted
``api_key_revoked``    ``key_id``: whether the key is valid
``presence_changed``   ``channel_id``: who is online in it
                       (``app.realtime.presence``)
=====================  =====================================================

**A message is a hint, never a grant.** ``NOTIFY`` is open to every role that
can connect to the database, so a message may be forged: it says only *what*
to look at again, never what is now true. The listener merges the messages of
a turn into one ``Hints`` (what to re-check, ``Hints.add``), which every
``ControlHandler`` applies by forgetting what it remembered of those users,
channels and keys, or (the open streams, ``app.realtime.control``) by reading
the tables again and following them. A forged message therefore changes
nothing that the tables do not say, and costs at most one re-check per turn,
however many messages come: ``Hints`` is bounded (``MAX_HINTS``), and past the
bound it becomes ``everything``, the re-check of all that a lost listener
connection gets. Nothing else delivers control messages, on either broker:
the NATS broker carries only events. A control message travels with the
change it hints at, delivered at its commit, which a NATS message sent
beside the transaction could not promise.

A message sent while an instance's listener was disconnected is lost to it,
so after every reconnect the handlers apply ``Hints(everything=True)``: they
re-read from the database what the messages would have told them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
    "presence_changed",
]


MAX_HINTS = 10_000  # ids one turn's Hints keeps; past it, everything is re-checked
_MAX_ID = 2**63 - 1


@dataclass(slots=True)
class Hints:
    """What a turn's control messages say may have changed: ids to look at
    again, merged, never a statement of what is true (see the module's doc)."""

    everything: bool = False  # a listener reconnected, or more than MAX_HINTS ids
    users: set[int] = field(default_factory=set)  # rights or existence
    subscribers: set[int] = field(default_factory=set)  # what their ``/stream`` follows
    channels: set[int] = field(default_factory=set)  # who may read them
    api_keys: set[int] = field(default_factory=set)  # whether they are valid
    presence: set[int] = field(default_factory=set)  # channels: who is online
    # Users with a stream that opened on an answer a hint may have overtaken
    # (``app.realtime.routes``): nothing is known to have changed, their
    # streams are only read again.
    recheck: set[int] = field(default_factory=set)

    def add(self, message: Any) -> bool:
        """Merge one decoded message; False, merging nothing, unless it is one
        ssehub sends: a known ``op`` with its id, a positive 64-bit integer."""
        op = message.get("op") if isinstance(message, dict) else None
        rule = _RULES.get(op) if isinstance(op, str) else None
        if rule is None:
            return False
        pick, name = rule
        value = message.get(name)
        if type(value) is not int or not 0 < value <= _MAX_ID:
            return False
        self._merge(pick(self), value)
        return True

    def recheck_streams_of(self, user_id: int) -> None:
        self._merge(self.recheck, user_id)

    def changed(self) -> bool:
        """Whether these hints say that rights may have changed (not only
        ``recheck`` or ``presence``): access answers read meanwhile may be out
        of date."""
        return self.everything or bool(
            self.users or self.subscribers or self.channels or self.api_keys
        )

    def __bool__(self) -> bool:
        return self.changed() or bool(self.recheck or self.presence)

    def _merge(self, ids: set[int], value: int) -> None:
        if self.everything:
            return
        ids.add(value)
        sets = (
            self.users,
            self.subscribers,
            self.channels,
            self.api_keys,
            self.presence,
            self.recheck,
        )
        if sum(map(len, sets)) > MAX_HINTS:  # bounded memory; one re-check of all costs the same
            self.everything = True
            for each in sets:
                each.clear()


_RULES: dict[str, tuple[Callable[[Hints], set[int]], str]] = {
    "channel_deleted": (lambda h: h.channels, "channel_id"),
    "access_changed": (lambda h: h.channels, "channel_id"),
    "subscribed": (lambda h: h.subscribers, "user_id"),
    "unsubscribed": (lambda h: h.subscribers, "user_id"),
    "user_changed": (lambda h: h.users, "user_id"),
    "api_key_revoked": (lambda h: h.api_keys, "key_id"),
    "presence_changed": (lambda h: h.presence, "channel_id"),
}


class ControlHandler(Protocol):
    """Something an instance keeps that control messages may have made untrue."""

    async def apply(self, conn: Any, hints: Hints) -> None:
        """Forget, or read again, what ``hints`` names (all of it with
        ``hints.everything``); ``conn`` is the listener's, for what it must read."""


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
    await notify_control_each_raw(conn, op, [fields])


async def notify_control_each_raw(conn: Any, op: ControlOp, each: list[dict[str, Any]]) -> None:
    """One message per item of ``each``, in one statement (delivered at commit)."""
    payloads = [control_payload(op, **fields) for fields in each]
    await conn.execute(
        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", CONTROL_CHANNEL, payloads
    )
