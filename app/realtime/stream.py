"""One open stream: what it carries, where it is, its outbox, and its one writer task.

A ``Stream`` is owned by the hub, and only its own methods change it: the hub
(fan-out, gaps, revocations, the ticker), the control messages
(``app.realtime.control``) and the writer task call methods, and read what
they need through read-only properties.

**Why not sse-starlette's ``EventSourceResponse``.** It runs four tasks per
stream and one ``send`` per frame. Here one writer task does everything and
writes all pending frames in one ``send``, so throughput rises with load (the
README's "Performance" compares the two). Under uvicorn's httptools protocol
(``ssehub serve``) that task is the stream's only one: the client going away
is told by ssehub's server protocol (``app.limits`` calls the hook set through
``DirectWriter.on_disconnect``), and read by the hub's ticker on uvicorn's
cycle in any case (``tick``). Only under a server without a ``DirectWriter``
does a second small task wait in ``receive`` for the disconnect.

**The hub never waits for a stream.** ``offer`` appends to a bounded outbox
and wakes the writer. A reader too slow to keep the outbox under its bound is
not allowed to hold more memory: the outbox is dropped and the stream marked
lagging; its writer then catches up from the event log from its position,
exactly as a resume does, and goes live again.

**Direct writes.** The hub hands each run of a page's events on one channel
to every stream of the channel, framed once as the bytes its socket needs
(``deliver``). A stream whose writer is parked (in ``wait``, nothing queued)
has them written straight to its socket (``DirectWriter.write_now``), without
waking the writer task: under a 10,000-way fan-out the wake-up, the task
switch and the writer's loop cost more than the write itself. Only a parked
writer lets the hub write: at any moment one of the two writes the stream,
so bytes never interleave inside a ``send`` and frames stay in id order.
``write_now`` writes all of the run or nothing; when it writes nothing the
events are offered to the outbox and the writer is woken as usual.

**No timer per stream.** Heartbeats, token expiry and sends stuck on a reader
that takes no bytes are all found by the hub's one ticker, which calls
``tick`` with the times that are due: a timer per stream and per wait, with a
timeout per send, would cost a third of the CPU of a 10,000-way fan-out.

**From history to live, race-free** (as in Mercure): the stream is registered
with the hub *before* the replay reads the log, at the hub's position then, so
an event committed at any moment is either read by the replay or queued live;
queued frames at or below the last replayed id are dropped as duplicates
(``take``), and live ones at or below the position never queue (``offer``).

A replay (a resume, or a slow stream catching up) reads the log page by page,
and before each page looks again at what the stream may carry and whether it
must end: a revocation or an expired token stops it within one page (pages
are bounded by bytes, ``app.events.log.PAGE_BYTES``), not at the end of a long
replay. Each page also says which channels retention pruned past the replay's
cursor, so a gap is told (``ssehub.truncated``) before the first event after
it, never skipped silently. A resume position above every id the database has
issued (a restore) would otherwise drop every live event as "already seen":
the stream says ``ssehub.reset`` and goes on from the head.

**Memory.** Ten thousand of these live for hours, so each holds little: slots;
what every stream shares on the class or in its collaborators; while nothing
is queued (most streams, most of the time) no outbox lists at all; and while
the stream is parked only its writer coroutine waits, on a bare future.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Collection, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.db import raw_connection
from app.events.log import Gap, StoredEvent, last_issued_id
from app.limits import SELF_TIMED
from app.metrics import Metrics
from app.realtime.direct_write import DirectWriter, direct_writer
from app.realtime.sse import HEARTBEAT, RETRY, event_frame, notice_frame

if TYPE_CHECKING:
    from app.realtime.hub import Hub
    from app.realtime.presence import Presence
    from app.realtime.replay import SharedPage

MAX_OUTBOX_FRAMES = 1000
MAX_OUTBOX_BYTES = 4 * 1024 * 1024
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Encoded once for every stream (no length: a stream has none).
RAW_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    *((name.lower().encode(), value.encode()) for name, value in HEADERS.items()),
]


class ReplayPages(Protocol):
    """Where a replay reads the log (``app.realtime.replay.SharedPages``)."""

    async def page(
        self, channel_ids: Collection[int], after: int, registered_at: int
    ) -> SharedPage: ...


class Stream:
    """One stream's state, which only its own methods write."""

    __slots__ = (
        "_channels",
        "_closed",
        "_direct",
        "_expires_at",
        "_follows_subscriptions",
        "_heartbeat_due",
        "_hub",
        "_lagging",
        "_last_write",
        "_metrics",
        "_noticed_gaps",
        "_outbox",
        "_outbox_bytes",
        "_outbox_ids",
        "_outbox_times",
        "_pool",
        "_position",
        "_presence",
        "_replays",
        "_resume_from",
        "_sending_since",
        "_user_id",
        "_waiter",
        "_writer",
    )

    def __init__(
        self,
        user_id: int,
        channels: dict[int, str],
        follows_subscriptions: bool,
        expires_at: float,
        resume_from: int | None,
        *,
        hub: Hub,
        replays: ReplayPages,
        pool: Any,
        metrics: Metrics,
        presence: Presence,
    ) -> None:
        """A stream at the hub's position now: register it with the hub before
        anything is awaited (module docstring, "From history to live")."""
        self._user_id = user_id
        self._channels = channels  # id -> name; the stream's own: it changes as it lives
        self._follows_subscriptions = follows_subscriptions  # GET /stream
        self._expires_at = expires_at  # wall clock: when the token expires
        self._resume_from = resume_from
        # The highest event id handed to the socket or the writer: live frames at
        # or below it are stale.
        self._position = hub.position
        self._lagging = False
        self._heartbeat_due = False
        self._closed: str | None = None  # why the stream must end, once it must
        # The outbox as three parallel lists, so queueing allocates nothing: the
        # frame (shared by every stream), the event id (0 for a notice) and the
        # publish timestamp (0 for a notice). An empty tuple while nothing is
        # queued, so an idle stream holds no lists at all (``_queue``).
        self._outbox: list[bytes] | tuple[()] = ()
        self._outbox_ids: list[int] | tuple[()] = ()
        self._outbox_times: list[float] | tuple[()] = ()
        self._outbox_bytes = 0
        self._last_write = time.monotonic()
        self._sending_since = 0.0  # monotonic start of the send in progress, 0 if none
        self._writer: asyncio.Task[None] | None = None
        self._direct: DirectWriter | None = None  # while the hub may write the socket
        # Per channel, the ``pruned_through`` of the last ``ssehub.truncated`` sent,
        # so one gap is told once however many pages and catch-ups see it.
        self._noticed_gaps: dict[int, int] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._hub = hub
        self._replays = replays
        self._pool = pool  # for ``last_issued_id`` only
        self._metrics = metrics
        self._presence = presence

    # What others read.

    @property
    def user_id(self) -> int:
        return self._user_id

    @property
    def channels(self) -> Mapping[int, str]:
        """The channels it carries, id -> name."""
        return self._channels

    @property
    def follows_subscriptions(self) -> bool:
        """A ``GET /stream``: it changes with the user's subscriptions."""
        return self._follows_subscriptions

    @property
    def position(self) -> int:
        return self._position

    @property
    def closed(self) -> str | None:
        """Why the stream must end, once it must."""
        return self._closed

    @property
    def lagging(self) -> bool:
        """Catching up from the log instead of taking live events."""
        return self._lagging

    # The hub's side: none of these waits.

    def deliver(
        self,
        run: Sequence[StoredEvent],
        frames: list[bytes],
        published: list[float],
        chunk: bytes,
        now: float,
    ) -> bool:
        """Hand over a run of live events on one channel: ``frames`` and
        ``published`` (their frames and publish timestamps), ``chunk`` (the
        frames as one HTTP chunk) shared by every stream of the channel; ``now``
        is ``time.monotonic()``. True if the run was written straight to the
        socket: nothing must go before it (the writer parked with an empty
        outbox, none of its ids at or below the position, not lagging, not
        closing) and the socket takes bytes now. Otherwise each event is
        offered to the outbox."""
        waiter = self._waiter
        direct = self._direct
        if (
            direct is not None
            and waiter is not None
            and not waiter.done()
            and not self._outbox
            and not self._lagging
            and self._closed is None
            and run[0].id > self._position
            and direct.write_now(chunk)
        ):
            self._position = run[-1].id
            self._last_write = now
            return True
        for event, frame, at in zip(run, frames, published, strict=True):
            self.offer(event.id, frame, at)
        return False

    def offer(self, event_id: int, frame: bytes, published_at: float) -> None:
        """Queue a live event and wake the writer; past the outbox's bound, catch
        up from the log instead (and count the slow reader)."""
        if self._lagging or self._closed or event_id <= self._position:
            return  # nothing to do; at or below the position it is stale
        if len(self._outbox) >= MAX_OUTBOX_FRAMES or self._outbox_bytes > MAX_OUTBOX_BYTES:
            self._metrics.slow_reader_catchups.inc()
            self.catch_up()
            return
        self._queue(frame, event_id, published_at)
        self._outbox_bytes += len(frame)
        self._wake()

    def catch_up(self) -> None:
        """Stop taking live events: the writer reads them from the log, from the
        position, as a resume does. Queued events are dropped (the log has them);
        queued notices are kept."""
        self._lagging = True
        if any(self._outbox_ids):
            queued = zip(self._outbox, self._outbox_ids, strict=True)
            notices = [frame for frame, event_id in queued if not event_id]
            self._outbox, self._outbox_ids, self._outbox_times = (), (), ()
            self._outbox_bytes = 0
            for frame in notices:
                self._queue(frame, 0, 0.0)
        self._wake()

    def mark_gap(self, pruned_through: int) -> None:
        """Retention removed events of a carried channel up to ``pruned_through``
        before they were fanned out: if some may not have reached this stream, it
        catches up, and its replay tells the gap (``ssehub.truncated``)."""
        if self._position < pruned_through:
            self.catch_up()

    def carry(self, channel_id: int, name: str) -> bool:
        """Carry the channel from now on; False if it already did."""
        if channel_id in self._channels:
            return False
        self._channels[channel_id] = name
        return True

    def uncarry(self, channel_id: int) -> bool:
        """Stop carrying the channel, without a notice; False if it did not."""
        return self._channels.pop(channel_id, None) is not None

    def revoke(self, channel_id: int, notice: bytes) -> bool:
        """The channel may no longer be read: tell it (``notice``), stop carrying
        it, and end the stream if it was a single channel's. False if it did
        not carry the channel (then nothing changes)."""
        if not self.uncarry(channel_id):
            return False
        self.notify(notice)
        if not self._follows_subscriptions:
            self.close("channel removed")
        return True

    def notify(self, frame: bytes) -> None:
        """Queue a notice (never dropped by the bound: notices are few and small)."""
        self._queue(frame, 0, 0.0)
        self._wake()

    def close(self, reason: str) -> None:
        """End the stream, for ``reason`` (the first one given stays)."""
        if self._closed is None:
            self._closed = reason
        self._wake()

    def disconnected(self) -> None:
        self.close("disconnected")

    def tick(self, wall: float, stuck_since: float, quiet_since: float) -> None:
        """The hub's ticker: cancel a send in progress since ``stuck_since`` or
        earlier (the send timeout), end the stream if its client left or its
        token expired (``wall``: ``time.time()``), and wake it for a heartbeat if
        nothing was written since ``quiet_since`` (monotonic times)."""
        if self._sending_since and self._sending_since <= stuck_since:
            if self._closed != "stalled" and self._writer is not None:
                self._closed = "stalled"
                self._writer.cancel()
        elif self._closed:
            return
        elif self._direct is not None and self._direct.disconnected:
            self.close("disconnected")
        elif self._expires_at <= wall:
            self.close("expired")
        elif self._last_write <= quiet_since:
            self._heartbeat_due = True
            self._wake()

    # The outbox.

    def _queue(self, frame: bytes, event_id: int, published_at: float) -> None:
        if not isinstance(self._outbox, list):
            self._outbox, self._outbox_ids, self._outbox_times = [], [], []
        self._outbox.append(frame)
        self._outbox_ids.append(event_id)  # type: ignore[union-attr]
        self._outbox_times.append(published_at)  # type: ignore[union-attr]

    def take(self) -> tuple[list[int], list[bytes], list[float]]:
        """Everything queued that is not stale (ids, frames, timestamps), emptying
        the outbox. Stale: an event at or below the position, queued live while a
        replay read it from the log."""
        ids, frames, times = self._outbox_ids, self._outbox, self._outbox_times
        if not isinstance(ids, list) or not isinstance(frames, list) or not isinstance(times, list):
            return [], [], []
        self._outbox, self._outbox_ids, self._outbox_times = (), (), ()
        self._outbox_bytes = 0
        position = self._position
        if any(0 < event_id <= position for event_id in ids):  # only right after a replay
            keep = [n for n, event_id in enumerate(ids) if event_id == 0 or event_id > position]
            ids = [ids[n] for n in keep]
            frames = [frames[n] for n in keep]
            times = [times[n] for n in keep]
        return ids, frames, times

    def gap_to_tell(self, channel_id: int, pruned_through: int, after: int) -> bool:
        """Whether a gap (events of ``channel_id`` at or below ``pruned_through``
        removed) is news to a stream that has delivered everything up to ``after``;
        if it is, it is remembered as told."""
        told = self._noticed_gaps.get(channel_id, 0) if self._noticed_gaps else 0
        if pruned_through <= max(after, told):
            return False
        if self._noticed_gaps is None:
            self._noticed_gaps = {}
        self._noticed_gaps[channel_id] = pruned_through
        return True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wait(self) -> Awaitable[None]:
        """Until something is queued, a heartbeat is due or the stream must close.

        A bare future rather than a coroutine: a parked stream (most streams,
        most of the time) holds no frame for it. A done waiter is no waiter
        (``deliver``), so nothing needs resetting after it completes."""
        waiter = asyncio.get_running_loop().create_future()
        if self._outbox or self._lagging or self._closed or self._heartbeat_due:
            waiter.set_result(None)
        else:
            self._waiter = waiter
        return waiter

    # The writer task.

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Write the stream until it must end, then leave the hub."""
        self._writer = asyncio.current_task()
        # The hub times this stream's sends (and counts a reader it lets go):
        # the server protocol's send deadline waits until the stream has ended.
        scope[SELF_TIMED] = True
        watcher = None
        try:
            start = {"type": "http.response.start", "status": 200, "headers": RAW_HEADERS}
            await self._send(send, start)
            direct = direct_writer(send)
            if direct is not None:
                direct.on_disconnect(self.disconnected)
                self._direct = direct
            else:
                watcher = asyncio.create_task(self._watch_disconnect(receive))
            await self._begin(send)
            # The live tail, until the stream must end. Here, not in a method of
            # its own: a parked stream then holds one frame less.
            while not (self._closed is not None and await self._end(send)):
                if self._lagging:
                    self._lagging = False
                    await self._replay(send, self._position)
                elif self._outbox:
                    await self._flush(send)
                elif self._heartbeat_due:
                    await self._write(send, HEARTBEAT)
                else:
                    await self.wait()
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away: it resumes with Last-Event-ID
        except asyncio.CancelledError:
            if self._closed != "stalled":
                raise
            # The hub's ticker cancelled a send the reader took no bytes of for the
            # send timeout: the connection is dropped (by the server protocol, once
            # the stream has ended: ``app.limits``) and the client resumes.
            if self._writer is not None:
                self._writer.uncancel()
            self._metrics.slow_reader_disconnects.inc()
        finally:
            if watcher is not None:
                watcher.cancel()
            self._writer = None
            self._direct = None
            self._hub.unregister(self)

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.close("disconnected")

    async def _send(self, send: Send, message: dict[str, Any]) -> None:
        """One ``send``, timed for the hub's ticker, which cancels one that a
        reader leaves stuck (``tick``)."""
        self._sending_since = time.monotonic()
        await send(message)
        self._sending_since = 0.0
        self._last_write = time.monotonic()
        self._heartbeat_due = False

    async def _write(self, send: Send, chunk: bytes) -> None:
        await self._send(send, {"type": "http.response.body", "body": chunk, "more_body": True})

    async def _begin(self, send: Send) -> None:
        """The retry line, what the client missed, then ``ssehub.live``.

        What it missed: the events fanned out before the stream registered,
        above its resume position, replayed from the log; nothing if its
        resume position is at or above the stream's (every later event comes
        live: a reconnect storm costs no query per stream); ``ssehub.reset`` if
        no id this database ever issued reaches it (a restore), and on from the
        head. Without a replay, it is all one write."""
        frames = [RETRY]
        replayed = 0
        resume_from = self._resume_from
        if resume_from is not None and resume_from < self._position:
            await self._write(send, RETRY)
            frames = []
            replayed = await self._replay(send, resume_from)
        elif resume_from is not None and resume_from > self._position:
            if resume_from > await self._last_issued():
                reset = {"last_event_id": self._position}
                frames.append(notice_frame("ssehub.reset", reset))
            else:
                self._position = resume_from  # in flight: it has them, live drops them
        if self._closed is None:
            frames.append(notice_frame("ssehub.live", {"replayed": replayed}))
            # Then the presence lists; from here on their joins and leaves are queued.
            frames.append(await self._presence.snapshots(self, self._channels))
        if frames:
            await self._write(send, b"".join(frames))

    async def _end(self, send: Send) -> bool:
        """The stream must end: its last words (the expiry notice, or what is queued,
        such as ``ssehub.channel_removed``). Always True."""
        if self._closed == "expired":
            await self._write(send, notice_frame("ssehub.expired", {}))
        elif self._outbox:
            await self._flush(send)
        return True

    async def _flush(self, send: Send) -> None:
        """All pending frames in one ``send``."""
        ids, frames, times = self.take()
        if not frames:
            return
        self._position = max(self._position, *ids)
        await self._write(send, frames[0] if len(frames) == 1 else b"".join(frames))
        self._metrics.deliveries.observe(
            time.time(), (at for event_id, at in zip(ids, times, strict=True) if event_id)
        )

    async def _last_issued(self) -> int:
        async with raw_connection(self._pool) as conn:
            return await last_issued_id(conn)

    async def _replay(self, send: Send, after: int) -> int:
        """Retained events after ``after`` from the log, page by page, each page
        one ``send``; returns how many. Afterwards queued live frames at or
        below the last replayed id are stale and dropped by ``take``."""
        cursor, count = after, 0
        while self._closed is None and self._channels:
            # Read (or shared with the streams asking the same: ``app.realtime.replay``)
            # on a pooled connection only for the read: never held while a client reads.
            shared = await self._replays.page(self._channels, cursor, self._hub.position)
            page = shared.page
            if shared.channels.issubset(self._channels):
                events, frames = page.events, shared.frames()
            else:  # a channel revoked since the read is left out
                events = [e for e in page.events if e.channel_id in self._channels]
                frames = b"".join(map(event_frame, events))
            chunk = self._gap_notices(page.gaps, cursor) + frames
            if chunk:
                await self._write(send, chunk)
            if page.events:
                cursor = page.events[-1].id
                count += len(events)
                self._metrics.deliveries.count(len(events))
            if not page.more:
                break
        self._position = max(self._position, cursor)
        return count

    def _gap_notices(self, gaps: list[Gap], cursor: int) -> bytes:
        """``ssehub.truncated`` for each channel the stream carries whose events
        past ``cursor`` retention removed, unless the stream told it already."""
        return b"".join(
            notice_frame("ssehub.truncated", {"channel": gap.channel, "oldest_id": gap.oldest_id})
            for gap in gaps
            if gap.channel_id in self._channels
            and self.gap_to_tell(gap.channel_id, gap.pruned_through, cursor)
        )


class EventStream(Response):
    """The Starlette response of a ``Stream``: its headers are the class's, and
    calling it runs the stream's writer. ``__call__`` returns the writer's
    coroutine itself instead of awaiting it in one of its own, so a parked
    stream holds no extra frame."""

    media_type = "text/event-stream"
    status_code = 200
    background = None
    raw_headers = RAW_HEADERS

    def __init__(self, stream: Stream) -> None:
        # Not ``Response.__init__``: it would encode the same headers again for
        # every stream, and the bytes would live as long as the stream.
        self.stream = stream

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        return self.stream.run(scope, receive, send)
