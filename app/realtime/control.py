"""Control messages applied to the open streams (``app.notify`` lists them).

Every message is a hint, whoever sent it: it only says which streams to look
at again. Subscribing, unsubscribing, a channel deleted, a member removed, a
channel made private, a user demoted or deleted: each is applied by one
re-check, which asks the database what the affected streams may carry now
(``app.channels.service.streams_access``) and makes them carry exactly that.
So a stream never carries a channel the tables do not let its user read (and,
for a ``/stream``, that the user is not subscribed to), and never drops one
they still let it carry, whatever a message claims. The hints of one
listener turn are re-checked together, in one query.

Why the tables are right at the end of every race: each change that affects
a stream notifies in its own transaction, Postgres delivers a notification
only once its transaction is visible to new snapshots, and the re-check it
causes reads a snapshot taken after that. So the last re-check of a stream reads every change committed
before it. A subscription that commits after a member's removal (its access
checked before the removal) causes a re-check that sees both, and leaves the
channel out.

**Streams that open while hints are applied.** A stream registers with the
hub after its access was read (``app.realtime.access``). A re-check collects
the streams it looks at when it starts: one registered later is not among
them, and its answer may predate the change. ``apply`` therefore moves the
cache's ``generation`` before it collects anything, with no wait in between;
a stream whose answer was read before the current generation started has the
listener re-check its user's streams on its next turn (``app.realtime.routes``),
after it registered. The argument is in ``app.realtime.access``.

After the broker's listener reconnects, the same re-check runs for every open
stream, because messages sent while it was away are lost: a revocation
survives a lost listener connection.
"""

from __future__ import annotations

from typing import Any

from app.channels.service import UserAccess, streams_access
from app.notify import Hints
from app.realtime.access import StreamAccessCache
from app.realtime.hub import Hub
from app.realtime.stream import Stream


class StreamControl:
    """The ``ControlHandler`` (``app.notify``) of the open streams, and of what
    opening streams remember (``StreamAccessCache``)."""

    def __init__(self, hub: Hub, access: StreamAccessCache) -> None:
        self._hub = hub
        self._access = access

    async def apply(self, conn: Any, hints: Hints) -> None:
        if hints.changed():
            self._access.forget(hints)  # first, and with no wait before collecting
        await self.recheck(conn, self._affected(hints))

    def _affected(self, hints: Hints) -> list[Stream]:
        """The open streams ``hints`` name: those of its users, those carrying its channels."""
        hub = self._hub
        if hints.everything:
            return hub.all_streams()
        streams: dict[int, Stream] = {}
        for user_id in hints.users | hints.subscribers | hints.recheck:
            streams.update((id(sub), sub) for sub in hub.streams_of(user_id))
        for channel_id in hints.channels:
            streams.update((id(sub), sub) for sub in hub.subscribers_of(channel_id))
        return list(streams.values())

    async def recheck(self, conn: Any, streams: list[Stream]) -> None:
        """Make each stream carry exactly what its user may read now (and, for a
        ``/stream``, is subscribed to); a user that no longer exists loses its streams."""
        if not streams:
            return
        carried = [(sub.user_id, cid) for sub in streams for cid in sub.channels]
        following = {sub.user_id for sub in streams if sub.follows_subscriptions}
        access = await streams_access(conn, carried, following)
        for sub in streams:
            user = access.get(sub.user_id)
            if user is None:
                sub.close("user deleted")
                continue
            self._narrow(sub, user)

    def _narrow(self, sub: Stream, user: UserAccess) -> None:
        """Drop what ``sub`` may no longer carry (with ``ssehub.channel_removed``
        if it became unreadable, silently if only unsubscribed); a ``/stream``
        also takes up the subscriptions it does not carry yet."""
        for channel_id, name in list(sub.channels.items()):
            readable = user.readable.get(channel_id)
            if readable is None:
                self._hub.revoke([sub], channel_id, name)
            elif sub.follows_subscriptions and not readable[1]:
                self._hub.uncarry(sub, channel_id)
        if sub.follows_subscriptions and not sub.closed:
            for channel_id, (name, subscribed) in user.readable.items():
                if subscribed:
                    self._hub.carry(sub, channel_id, name)
