"""What an opening stream may carry: asked of the database once, then remembered.

A reconnect storm (a deploy, a load balancer failing over) reopens thousands
of streams a second, mostly for users whose access has not changed: each
open asked Postgres the same question (``stream_access``). The answer is kept
per (user, channel or ``/stream``) until a control message says it may have
changed, on this instance as on every other:

- ``subscribed``, ``unsubscribed``, ``user_changed``: that user's answers go;
- ``access_changed``, ``channel_deleted``: the answers that carry the channel
  go (a channel newly readable was never in an answer: refusals are not kept);
- a reconnected listener forgets everything (messages may have been lost).

A query that was in flight while a message was applied may have read the old
state: it is asked again (``generation``). Streams asking the same while it is
asked wait for that one query (a storm of a thousand opens at once is one
query, not a thousand). The stream registers with the hub
right after ``get`` returns, with no wait in between, so every later message
finds it: no revocation falls between the answer and the registration.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.channels.service import StreamAccess, stream_access
from app.db import raw_connection

CACHE_SIZE = 100_000


class StreamAccessCache:
    """``stream_access`` with memory; a ``ControlHandler`` (``app.notify``)."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, str | None], StreamAccess] = {}
        self._asking: dict[tuple[int, str | None], asyncio.Future[StreamAccess]] = {}
        self._generation = 0

    async def get(self, pool: Any, user_id: int, name: str | None) -> StreamAccess:
        """What ``user_id`` may carry on ``name`` (``None``: ``/stream``); 401/404 as
        ``stream_access``."""
        key = (user_id, name)
        known = self._known.get(key)
        if known is not None:
            return known
        asking = self._asking.get(key)
        if asking is None:
            # A task of its own: the stream that asked first may go away meanwhile.
            asking = asyncio.ensure_future(self._ask(pool, key))
            self._asking[key] = asking
            asking.add_done_callback(lambda _: self._asking.pop(key, None))
        return await asyncio.shield(asking)

    async def _ask(self, pool: Any, key: tuple[int, str | None]) -> StreamAccess:
        user_id, name = key
        async with raw_connection(pool) as conn:
            while True:
                generation = self._generation
                access = await stream_access(conn, user_id, name)
                if generation == self._generation:
                    break
        if len(self._known) >= CACHE_SIZE:
            self._known.clear()
        self._known[key] = access
        return access

    async def apply(self, _conn: Any, message: dict[str, Any]) -> None:
        self._generation += 1
        op = message.get("op")
        if op in ("subscribed", "unsubscribed", "user_changed"):
            user_id = int(message["user_id"])
            for key in [key for key in self._known if key[0] == user_id]:
                del self._known[key]
        elif op in ("access_changed", "channel_deleted"):
            channel_id = int(message["channel_id"])
            for key, access in list(self._known.items()):
                if channel_id in access.channels:
                    del self._known[key]

    async def resync(self, _conn: Any) -> None:
        self._generation += 1
        self._known.clear()
