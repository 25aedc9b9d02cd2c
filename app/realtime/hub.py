"""The in-process hub: fans each live event out to the subscribers of its channel.

Fan-out encodes a frame once per event and hands the same bytes to every
subscriber, without awaiting any of them (see ``fan_out``). The
hub's ``position`` is the highest id it has fanned out: a stream opened
without a resume position starts there. Only the hub moves it, when its
broker delivers (``deliver``; ``app.realtime.broker`` argues why here).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable
from itertools import groupby

from app.errors import TooManyRequests
from app.events.log import Gap, StoredEvent
from app.metrics import Metrics
from app.realtime.broker import Follower
from app.realtime.sse import event_frame, http_chunk, notice_frame
from app.realtime.subscriber import Subscriber

SEND_TIMEOUT_SECONDS = 30.0  # a reader that takes no bytes for this long is let go (default)


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
        self._by_channel: defaultdict[int, set[Subscriber]] = defaultdict(set)
        self._by_user: defaultdict[int, set[Subscriber]] = defaultdict(set)

    def register(self, sub: Subscriber) -> None:
        """Start routing live events to ``sub``; 429 past the per-user limit."""
        streams = self._by_user[sub.user_id]
        if len(streams) >= self._max_per_user:
            raise TooManyRequests(
                f"At most {self._max_per_user} open streams per user on this instance"
            )
        streams.add(sub)
        for channel_id in sub.channels:
            self._route(sub, channel_id)
        self._metrics.streams_open.inc()

    def unregister(self, sub: Subscriber) -> None:
        streams = self._by_user.get(sub.user_id)
        if streams is None or sub not in streams:
            return
        streams.discard(sub)
        if not streams:
            del self._by_user[sub.user_id]
        for channel_id in sub.channels:
            self._unroute(sub, channel_id)
        self._metrics.streams_open.dec()

    def fan_out(self, events: Iterable[StoredEvent]) -> None:
        """Hand a page of events to the subscribers of their channels, in order.

        Each run of consecutive events on one channel is encoded once, as the
        bytes its sockets need, and the same bytes go to every subscriber of the
        channel: written straight to the sockets of idle streams
        (``Subscriber.write_run``), else queued one event at a time for the
        stream's writer (``Subscriber.offer``), which writes all it finds in one
        ``send``. A subscriber gets the runs in page order, so ids stay increasing
        on every stream."""
        deliveries = self._metrics.deliveries
        now, monotonic = time.time(), time.monotonic()
        overflowed = 0
        for channel_id, grouped in groupby(events, key=lambda event: event.channel_id):
            run = list(grouped)
            self.position = max(self.position, run[-1].id)
            subscribers = self._by_channel.get(channel_id)
            if not subscribers:
                continue
            frames = [event_frame(event) for event in run]
            published = [event.published_at.timestamp() for event in run]
            chunk = http_chunk(frames[0] if len(frames) == 1 else b"".join(frames))
            first_id, last_id = run[0].id, run[-1].id
            written = 0
            for sub in subscribers:
                if sub.write_run(chunk, first_id, last_id, monotonic):
                    written += 1
                    continue
                for event, frame, at in zip(run, frames, published, strict=True):
                    if sub.offer(event.id, frame, at):
                        overflowed += 1
            deliveries.observe(now, published, copies=written)
        if overflowed:
            self._metrics.slow_reader_catchups.inc(overflowed)

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
        for sub in self._by_channel.get(gap.channel_id, ()):
            if sub.position < gap.pruned_through:
                sub.catch_up()

    def carry(self, sub: Subscriber, channel_id: int, name: str) -> None:
        """``sub`` carries the channel's live events from now on, if it is still
        registered (a re-check may end after its stream did: routing it then would
        keep it in the routes for good)."""
        if channel_id not in sub.channels and sub in self._by_user.get(sub.user_id, ()):
            sub.channels[channel_id] = name
            self._route(sub, channel_id)

    def uncarry(self, sub: Subscriber, channel_id: int) -> None:
        """``sub`` stops carrying the channel, without a notice."""
        if sub.channels.pop(channel_id, None) is not None:
            self._unroute(sub, channel_id)

    def revoke(self, subscribers: Iterable[Subscriber], channel_id: int, name: str) -> None:
        """The channel is gone or no longer readable for these subscribers:
        tell them, stop carrying it, and end single-channel streams."""
        frame = notice_frame("ssehub.channel_removed", {"channel": name})
        for sub in list(subscribers):
            if channel_id not in sub.channels:
                continue
            self.uncarry(sub, channel_id)
            sub.notify(frame)
            if not sub.follows_subscriptions:
                sub.close("channel removed")

    def carries_any(self) -> bool:
        """Whether any open stream carries any channel."""
        return bool(self._by_channel)

    def subscribers_of(self, channel_id: int) -> list[Subscriber]:
        return list(self._by_channel.get(channel_id, ()))

    def streams_of(self, user_id: int) -> list[Subscriber]:
        return list(self._by_user.get(user_id, ()))

    def all_streams(self) -> list[Subscriber]:
        return [sub for streams in self._by_user.values() for sub in streams]

    async def tick_forever(self, heartbeat: float) -> None:
        """Run ``tick`` a few times per heartbeat interval (at most a second apart)."""
        interval = min(1.0, heartbeat / 4)
        while True:
            await asyncio.sleep(interval)
            self.tick(heartbeat, interval)

    def tick(self, heartbeat: float, slack: float) -> None:
        """The one timer of all streams (see ``app.realtime.subscriber``): cancel
        writes stuck for the send timeout (``SSEHUB_SEND_TIMEOUT_SECONDS``), end
        streams whose client left (read on uvicorn's cycle, instead of a task per
        stream waiting for it) or whose token has expired, and wake those due a
        heartbeat (``slack`` early, so none is late)."""
        mono, wall = time.monotonic(), time.time()
        for streams in self._by_user.values():
            for sub in streams:
                if sub.sending_since and mono - sub.sending_since >= self._send_timeout:
                    if sub.closed != "stalled" and sub.writer is not None:
                        sub.closed = "stalled"
                        sub.writer.cancel()
                elif sub.closed:
                    continue
                elif sub.cycle is not None and sub.cycle.disconnected:
                    sub.close("disconnected")
                elif sub.expires_at <= wall:
                    sub.close("expired")
                elif mono - sub.last_write >= heartbeat - slack:
                    sub.heartbeat_due = True
                    sub.wake()

    def close_all(self, reason: str) -> None:
        """End every stream (shutdown): clients reconnect to another instance."""
        for streams in list(self._by_user.values()):
            for sub in list(streams):
                sub.close(reason)

    def carries(self, channel_id: int) -> bool:
        return channel_id in self._by_channel

    def carried_channels(self) -> list[int]:
        return list(self._by_channel)

    def _route(self, sub: Subscriber, channel_id: int) -> None:
        subscribers = self._by_channel[channel_id]
        if not subscribers:
            self._broker.follow(channel_id)
        subscribers.add(sub)

    def _unroute(self, sub: Subscriber, channel_id: int) -> None:
        subscribers = self._by_channel.get(channel_id)
        if subscribers is not None:
            subscribers.discard(sub)
            if not subscribers:
                del self._by_channel[channel_id]
                self._broker.unfollow(channel_id)
