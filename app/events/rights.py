"""Who may publish where, answered before a publish's body is read.

A publish body may be megabytes, and the ordered writer is shared by every
instance: a caller who may not publish must be refused before either is
touched. ``PublishRights.check`` answers
from what this process already knows, asking the database only for what it
does not: one indexed query on the hot paths' pool, never the writer.

An API key may publish where its patterns match (``ApiKeyGrant.allows``),
else 403; the channel must exist (404).

What is remembered, and why it stays true:
- whether a user is an admin, per user id: forgotten on a hint that the user
  changed (a ``user_changed`` control message: a promotion, a demotion, a
  deletion), sent in the transaction that makes the change;
- a channel's id by name, for channels that exist: forgotten on a hint about
  the channel (``channel_deleted``).
Everything is forgotten when the broker's listener reconnects, because
control messages sent while it was away are lost (``Hints.everything``).
A forged hint only makes the next check ask the database again.
A refusal for a channel that does not exist is never remembered: the channel
may be created the next moment, on another instance.

A stale "may publish" can only let a request reach the writer, whose database
function checks the caller and the channel again in the writing transaction;
this module is the fast refusal, not the only check.
"""

from __future__ import annotations

from typing import Any

from app.auth.identity import Caller
from app.channels.readable import READABLE
from app.channels.service import lookup_name
from app.db import raw_connection
from app.errors import Forbidden, NotFound, Unauthorized
from app.notify import Hints

CACHE_SIZE = 10_000  # entries per map; cleared whole when full (simple, and bounded)

_CALLER = "SELECT is_admin FROM public.users WHERE id = $1"
# The channel's id, and whether user $2 (NULL for an API key) may read it.
_CHANNEL = f"""
SELECT c.id, coalesce({READABLE}, false)
FROM public.channels c LEFT JOIN public.users u ON u.id = $2 WHERE c.name = $1"""  # noqa: S608 - READABLE is a constant


class PublishRights:
    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._admins: dict[int, bool] = {}
        self._channels: dict[str, int] = {}

    async def check(self, caller: Caller, channel: str) -> None:
        """Return if ``caller`` may publish to ``channel``; else raise what it gets:
        401 (no such user), 404 (no channel it can see), 403."""
        if caller.api_key is not None:
            if not caller.api_key.allows(channel):
                raise Forbidden("This API key may not publish to this channel")
            may = True
        else:
            admin = self._admins.get(caller.user())
            may = await self._is_admin(caller.user()) if admin is None else admin
        if may and channel in self._channels:
            return
        async with raw_connection(self._pool) as conn:
            row = await conn.fetchrow(_CHANNEL, lookup_name(channel), caller.user_id)
        if row is None or not (may or row[1]):
            raise NotFound(f"Channel {channel!r} not found")
        if not may:
            raise Forbidden("Admin only")
        _remember(self._channels, channel, row[0])

    async def _is_admin(self, user_id: int) -> bool:
        async with raw_connection(self._pool) as conn:
            is_admin = await conn.fetchval(_CALLER, user_id)
        if is_admin is None:
            raise Unauthorized("User no longer exists")
        _remember(self._admins, user_id, bool(is_admin))
        return bool(is_admin)

    # -- kept true by the control messages (``app.realtime.listener``) -----------

    async def apply(self, _conn: Any, hints: Hints) -> None:
        if hints.everything:
            self._admins.clear()
            self._channels.clear()
            return
        for user_id in hints.users:
            self._admins.pop(user_id, None)
        if hints.channels:
            for name, channel_id in list(self._channels.items()):
                if channel_id in hints.channels:
                    del self._channels[name]


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= CACHE_SIZE:
        cache.clear()
    cache[key] = value
