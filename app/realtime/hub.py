"""The in-process hub: fans each live event out to the streams of its channel.

Fan-out encodes a frame once per event and hands the same bytes to every
stream, without awaiting any of them (see ``fan_out``). The hub owns the open
streams (``app.realtime.stream.Stream``) and routes events to them; it changes
a stream only through the stream's methods. The hub's ``position`` is the
highest id it has fanned out: a stream opened without a resume position
starts there. Only the hub moves it, when its broker delivers (``deliver``;
``app.realtime.broker`` argues why here).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from itertools import groupby

from app.errors import TooManyRequests
from app.events.log import Gap, StoredEvent
from app.metrics import Metrics
from app.realtime.broker import Follower
from app.realtime.sse import event_frame, http_chunk, notice_frame
from app.realtime.stream import Stream

SEND_TIMEOUT_SECONDS = 30.0  # a reader that takes no bytes for this long is let go (default)
_NONE: frozenset[Stream] = frozenset()


class Hub:
    def __init__(
        self,
        metrics: Metrics,
        broker: Follower,
        max_streams_per_user: int,
        send_timeout: float = SEND_TIMEOUT_SECONDS,
    ) -> None:
        self.position = 0
        # Told when a channel gains its first stream or loses its last: the NATS
        # broker subscribes only to what is carried.
        self._broker = broker
        self._metrics = metrics
        self._max_per_user = max_streams_per_user
        self._send_timeout = send_timeout
        self._by_channel: defaultdict[int, set[Stream]] = defaultdict(set)
        self._by_user: defaultdict[int, set[Stream]] = defaultdict(set)

    def register(self, stream: Stream) -> None:
        """Start routing live events to ``stream``; 429 past the per-user limit."""
        of_user = self._by_user[stream.user_id]
        if len(of_user) >= self._max_per_user:
            raise TooManyRequests(
                f"At most {self._max_per_user} open streams per user on this instance"
            )
        of_user.add(stream)
        for channel_id in stream.channels:
            self._route(stream, channel_id)
        self._metrics.streams_open.inc()

    def unregister(self, stream: Stream) -> None:
        of_user = self._by_user.get(stream.user_id)
        if of_user is None or stream not in of_user:
            return
        of_user.discard(stream)
        if not of_user:
            del self._by_user[stream.user_id]
        for channel_id in stream.channels:
            self._unroute(stream, channel_id)
        self._metrics.streams_open.dec()

    def fan_out(self, events: Iterable[StoredEvent]) -> None:
        """Hand a page of events to the streams of their channels, in order.

        Each run of consecutive events on one channel is encoded once, as the
        bytes its sockets need, and the same bytes go to every stream of the
        channel (``Stream.deliver``): written straight to the sockets of idle
        streams, else queued one event at a time for the stream's writer, which
        writes all it finds in one ``send``. A stream gets the runs in page
        order, so ids stay increasing on every stream. The position is not
        moved here: ``deliver`` moves it, past these events and the ids between."""
        deliveries = self._metrics.deliveries
        now, monotonic = time.time(), time.monotonic()
        for channel_id, grouped in groupby(events, key=lambda event: event.channel_id):
            run = list(grouped)
            streams = self._by_channel.get(channel_id)
            if not streams:
                continue
            frames = [event_frame(event) for event in run]
            published = [event.published_at.timestamp() for event in run]
            chunk = http_chunk(frames[0] if len(frames) == 1 else b"".join(frames))
            written = 0
            for stream in streams:
                if stream.deliver(run, frames, published, chunk, monotonic):
                    written += 1
            deliveries.observe(now, published, copies=written)
            deliveries.direct_writes += written

    def deliver(self, events: list[StoredEvent], through: int) -> None:
        """The broker hands over ``events`` (in id order) and every other id up to
        ``through``: fan them out, and move the position, in one step with no
        await, so a stream registering takes a position whose every later event
        it gets live or by its replay."""
        if events:
            self.fan_out(events)
        self.position = max(self.position, through)

    def mark_gap(self, gap: Gap) -> None:
        """Retention removed events of a channel before they were fanned out: every
        stream of the channel that may have missed some catches up from the log,
        whose replay tells it (``ssehub.truncated``) before the first event after
        the gap. A stream never skips ids silently."""
        for stream in self._by_channel.get(gap.channel_id, ()):
            stream.mark_gap(gap.pruned_through)

    def carry(self, stream: Stream, channel_id: int, name: str) -> None:
        """``stream`` carries the channel's live events from now on, if it is still
        registered (a re-check may end after its stream did: routing it then would
        keep it in the routes for good)."""
        if stream in self._by_user.get(stream.user_id, ()) and stream.carry(channel_id, name):
            self._route(stream, channel_id)

    def uncarry(self, stream: Stream, channel_id: int) -> None:
        """``stream`` stops carrying the channel, without a notice."""
        if stream.uncarry(channel_id):
            self._unroute(stream, channel_id)

    def revoke(self, streams: Iterable[Stream], channel_id: int, name: str) -> None:
        """The channel is gone or no longer readable for these streams: each
        tells its client, stops carrying it, and ends if it carried only that
        one (``Stream.revoke``)."""
        frame = notice_frame("ssehub.channel_removed", {"channel": name})
        for stream in list(streams):
            if stream.revoke(channel_id, frame):
                self._unroute(stream, channel_id)

    def carries_any(self) -> bool:
        """Whether any open stream carries any channel."""
        return bool(self._by_channel)

    def subscribers_of(self, channel_id: int) -> AbstractSet[Stream]:
        """The channel's streams, as the hub's own set, not a copy: presence reads it
        every turn for every channel. Copy it before calling anything that may
        end or reroute a stream."""
        return self._by_channel.get(channel_id, _NONE)

    def streams_of(self, user_id: int) -> list[Stream]:
        return list(self._by_user.get(user_id, ()))

    def all_streams(self) -> list[Stream]:
        return [stream for streams in self._by_user.values() for stream in streams]

    async def tick_forever(self, heartbeat: float) -> None:
        """Run ``tick`` a few times per heartbeat interval (at most a second apart)."""
        interval = min(1.0, heartbeat / 4)
        while True:
            await asyncio.sleep(interval)
            self.tick(heartbeat, interval)

    def tick(self, heartbeat: float, slack: float) -> None:
        """The one timer of all streams (see ``app.realtime.stream``): each stream
        cancels a write stuck for the send timeout (``SSEHUB_SEND_TIMEOUT_SECONDS``),
        ends if its client left (read on uvicorn's cycle, instead of a task per
        stream waiting for it) or its token has expired, and wakes for a
        heartbeat (``slack`` early, so none is late)."""
        mono, wall = time.monotonic(), time.time()
        stuck_since = mono - self._send_timeout
        quiet_since = mono - (heartbeat - slack)
        for streams in self._by_user.values():
            for stream in streams:
                stream.tick(wall, stuck_since, quiet_since)

    def close_all(self, reason: str) -> None:
        """End every stream (shutdown): clients reconnect to another instance."""
        for streams in list(self._by_user.values()):
            for stream in list(streams):
                stream.close(reason)

    def carries(self, channel_id: int) -> bool:
        return channel_id in self._by_channel

    def carried_channels(self) -> list[int]:
        return list(self._by_channel)

    def _route(self, sub: Stream, channel_id: int) -> None:
        subscribers = self._by_channel[channel_id]
        if not subscribers:
            self._broker.follow(channel_id)
        subscribers.add(sub)

    def _unroute(self, sub: Stream, channel_id: int) -> None:
        subscribers = self._by_channel.get(channel_id)
        if subscribers is not None:
            subscribers.discard(sub)
            if not subscribers:
                del self._by_channel[channel_id]
                self._broker.unfollow(channel_id)
