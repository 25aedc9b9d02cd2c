"""Control messages applied to the open streams (``app.notify`` lists them).

Subscribing and unsubscribing change what a ``/stream`` carries at once, from
the message alone. Everything that can take a channel away from a stream
(a channel deleted, a member removed, a channel made private, a user demoted
or deleted) is applied by one re-check: ask the database what the affected
streams may carry now (``app.channels.service.streams_access``) and make them
carry exactly that. After the broker's listener reconnects, the same re-check
runs for every open stream, because messages sent while it was away are lost:
a revocation survives a lost listener connection.
"""

from __future__ import annotations

import logging
from typing import Any

from app.channels.service import UserAccess, streams_access
from app.realtime.hub import Hub
from app.realtime.subscriber import Subscriber

log = logging.getLogger("ssehub")


class StreamControl:
    """The ``ControlHandler`` (``app.notify``) of the open streams."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def apply(self, conn: Any, message: dict[str, Any]) -> None:
        op = message.get("op")
        hub = self._hub
        if op == "channel_deleted":
            hub.revoke(hub.subscribers_of(int(message["channel_id"])), *_channel(message))
        elif op == "access_changed":
            await self.recheck(conn, hub.subscribers_of(int(message["channel_id"])))
        elif op == "user_changed":
            await self.recheck(conn, hub.streams_of(int(message["user_id"])))
        elif op == "subscribed":
            hub.add_channel(int(message["user_id"]), *_channel(message))
        elif op == "unsubscribed":
            hub.drop_channel(int(message["user_id"]), int(message["channel_id"]))

    async def resync(self, conn: Any) -> None:
        await self.recheck(conn, self._hub.all_streams())

    async def recheck(self, conn: Any, streams: list[Subscriber]) -> None:
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
            sub.is_admin = user.is_admin
            self._narrow(sub, user)

    def _narrow(self, sub: Subscriber, user: UserAccess) -> None:
        """Drop what ``sub`` may no longer carry (with ``ssehub.channel_removed``
        if it became unreadable, silently if only unsubscribed); a ``/stream``
        also takes up subscriptions it missed."""
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


def _channel(message: dict[str, Any]) -> tuple[int, str]:
    return int(message["channel_id"]), str(message["channel"])
