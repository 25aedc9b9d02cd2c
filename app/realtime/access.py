"""What an opening stream may carry: asked of the database once, then remembered.

A reconnect storm (a deploy, a load balancer failing over) reopens thousands
of streams a second, mostly for users whose access has not changed: each
open asked Postgres the same question (``stream_access``). The answer is kept
per (user, channel or ``/stream``) until a control message hints that it may
have changed, on this instance as on every other (``forget``, called by
``app.realtime.control`` as it applies each turn's hints):

- hints about a user (its subscriptions, rights or existence): its answers go;
- hints about a channel: the answers that carry it go (a channel newly
  readable was never in an answer: refusals are not kept);
- a reconnected listener forgets everything (messages may have been lost).

Streams asking the same while it is asked wait for that one query (a storm of
a thousand opens at once is one query, not a thousand).

**No revocation falls between the answer and the registration.** Each
``forget`` moves ``generation``, and ``get`` returns with its answer the
generation it is true as of: for a remembered answer, the current one (what a
hint may have made untrue was forgotten in the same step that moved the
generation); for a fresh one, the generation when its query was sent (it is
remembered only if no hint came while it was asked). The stream registers
with the hub in the same step (no wait) as it compares that with the current
generation (``app.realtime.routes``). Take any change, and the re-check its
hint causes: the re-check moves the generation and collects the streams it
looks at in one step, at some moment *a*, after the change committed. A
stream registered before *a* is among those re-checked. A stream registered
after *a* with an unchanged generation had its answer true as of a
generation begun after *a*: its query was sent after the change committed, so
it read the change. A stream whose generation moved has the listener re-check
its user's streams on the next turn, which reads after *a*. Either way, the
change applies to it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from app.channels.service import StreamAccess, stream_access
from app.db import raw_connection
from app.notify import Hints

CACHE_SIZE = 100_000
Key = tuple[int, str | None]  # (user, channel name; None for ``/stream``)


class StreamAccessCache:
    """``stream_access`` with memory, forgotten on hints (``app.realtime.control``)."""

    def __init__(self) -> None:
        self._known: dict[Key, StreamAccess] = {}
        # The keys of ``_known`` by user and by channel carried, so that what a
        # turn's hints name is found without reading every answer: a flood of
        # hints costs what they name, not the cache's size per turn.
        self._of_user: defaultdict[int, set[Key]] = defaultdict(set)
        self._of_channel: defaultdict[int, set[Key]] = defaultdict(set)
        self._asking: dict[Key, asyncio.Future[tuple[StreamAccess, int]]] = {}
        self.generation = 0  # moved by every ``forget``

    async def get(self, pool: Any, user_id: int, name: str | None) -> tuple[StreamAccess, int]:
        """What ``user_id`` may carry on ``name`` (``None``: ``/stream``), and the
        generation it is true as of; 401/404 as ``stream_access``."""
        key = (user_id, name)
        known = self._known.get(key)
        if known is not None:
            return known, self.generation
        asking = self._asking.get(key)
        if asking is None:
            # A task of its own: the stream that asked first may go away meanwhile.
            asking = asyncio.ensure_future(self._ask(pool, key))
            self._asking[key] = asking
            asking.add_done_callback(lambda _: self._asking.pop(key, None))
        return await asyncio.shield(asking)

    async def _ask(self, pool: Any, key: Key) -> tuple[StreamAccess, int]:
        user_id, name = key
        async with raw_connection(pool) as conn:
            generation = self.generation
            access = await stream_access(conn, user_id, name)
        if generation == self.generation:  # no hint while it was asked: it may be kept
            self._keep(key, access)
        return access, generation

    def forget(self, hints: Hints) -> None:
        """Move the generation; forget every answer ``hints`` may have made untrue."""
        self.generation += 1
        if hints.everything:
            self._clear()
            return
        doomed: set[Key] = set()
        for user_id in hints.users | hints.subscribers:
            doomed |= self._of_user.get(user_id, set())
        for channel_id in hints.channels:
            doomed |= self._of_channel.get(channel_id, set())
        for key in doomed:
            self._drop(key)

    def _keep(self, key: Key, access: StreamAccess) -> None:
        if len(self._known) >= CACHE_SIZE:
            self._clear()
        self._drop(key)
        self._known[key] = access
        self._of_user[key[0]].add(key)
        for channel_id in access.channels:
            self._of_channel[channel_id].add(key)

    def _drop(self, key: Key) -> None:
        access = self._known.pop(key, None)
        if access is None:
            return
        _unindex(self._of_user, key[0], key)
        for channel_id in access.channels:
            _unindex(self._of_channel, channel_id, key)

    def _clear(self) -> None:
        self._known.clear()
        self._of_user.clear()
        self._of_channel.clear()


def _unindex(index: dict[int, set[Key]], id_: int, key: Key) -> None:
    keys = index.get(id_)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[id_]
