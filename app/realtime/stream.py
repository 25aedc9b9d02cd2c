"""One SSE response: a single writer that replays, then follows the live tail.

Why not sse-starlette's ``EventSourceResponse``: it runs four tasks per
stream and one ``send`` per frame. Here one writer task does everything and
writes all pending frames in one ``send``, so throughput rises with load
(the README's "Performance" compares the two). Under uvicorn's httptools
protocol that task is the stream's only one: the client going away is told by
ssehub's server protocol (``app.limits`` calls ``Subscriber.disconnected``)
and read by the hub's ticker in any case. Under any other server a second
small task waits in ``receive`` for the disconnect.

The handoff from history to live is race-free, as in Mercure: the subscriber
is registered with the hub *before* the replay reads the log, so an event
committed at any moment is either read by the replay or queued live; queued
frames at or below the last replayed id are dropped as duplicates.

A replay (a resume, or a slow stream catching up) reads the log page by page,
and before each page looks again at what the stream may carry and whether it
must end: a revocation or an expired token stops it within one page (pages
are bounded by bytes, ``app.events.log.PAGE_BYTES``), not at the end of a long
replay. Each page also says which channels retention pruned past the
replay's cursor, so a gap is told (``ssehub.truncated``) before the first
event after it, never skipped silently. A resume position above every id the
database has issued (a restore) would otherwise drop every live event as
"already seen": the stream says ``ssehub.reset`` and goes on from the head.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.db import raw_connection
from app.events.log import Gap, last_issued_id
from app.limits import SELF_TIMED
from app.realtime.sse import HEARTBEAT, RETRY, event_frame, notice_frame
from app.realtime.subscriber import Subscriber

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def uvicorn_cycle(send: Send) -> Any | None:
    """The uvicorn (httptools) response cycle behind ``send``, if that is what it
    is: its transport can then be written to directly, between ``send`` calls,
    with bytes framed as uvicorn frames each ``send`` (``sse.http_chunk``). Any
    other ``send`` (a middleware's wrapper, h11, another server) is only awaited.
    """
    cycle = getattr(send, "__self__", None)
    if type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl":
        return None
    if not all(
        hasattr(cycle, a) for a in ("transport", "flow", "disconnected", "chunked_encoding")
    ):
        return None
    return cycle


# Encoded once for every stream (no length: a stream has none).
RAW_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    *((name.lower().encode(), value.encode()) for name, value in HEADERS.items()),
]


class EventStream(Response):
    """Ten thousand of these live for hours, so each holds little: what every
    stream shares is on the class or on ``state``, and while the stream is
    parked only this coroutine waits (``__call__``), on a bare future."""

    media_type = "text/event-stream"
    status_code = 200
    background = None
    raw_headers = RAW_HEADERS

    def __init__(self, state: Any, sub: Subscriber, resume_from: int | None) -> None:
        # Not ``Response.__init__``: it would encode the same headers again for
        # every stream, and the bytes would live as long as the stream.
        self._state = state  # the app's: hub, pool, metrics
        self._sub = sub
        self._resume_from = resume_from

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self._sub
        sub.writer = asyncio.current_task()
        # The hub times this stream's sends (and counts a reader it lets go):
        # the server protocol's send deadline waits until the stream has ended.
        scope[SELF_TIMED] = True
        watcher = None
        try:
            start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            await self._send(send, start)
            cycle = uvicorn_cycle(send)
            if cycle is not None and cycle.chunked_encoding is True:
                # Frames may go straight to its transport, and no task of the
                # stream's own waits for the client to leave: ssehub's server
                # protocol calls ``on_disconnect`` (``app.limits``), and the hub's
                # ticker reads ``disconnected`` on the cycle in any case.
                sub.cycle = cycle
                sub.write_now = self._write_now
                cycle.on_disconnect = sub.disconnected
            else:
                watcher = asyncio.create_task(self._watch_disconnect(receive))
            await self._begin(send)
            # The live tail, until the stream must end. Here, not in a method of
            # its own: a parked stream then holds one frame less.
            while not (sub.closed is not None and await self._end(send)):
                if sub.lagging:
                    sub.lagging = False
                    await self._replay(send, sub.position)
                elif sub.outbox:
                    await self._flush(send)
                elif sub.heartbeat_due:
                    await self._write(send, HEARTBEAT)
                else:
                    await sub.wait()
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away: it resumes with Last-Event-ID
        except asyncio.CancelledError:
            if sub.closed != "stalled":
                raise
            # The hub's ticker cancelled a send the reader took no bytes of for the
            # send timeout: the connection is dropped (by the server protocol, once
            # the stream has ended: ``app.limits``) and the client resumes.
            if sub.writer is not None:
                sub.writer.uncancel()
            self._state.metrics.slow_reader_disconnects.inc()
        finally:
            if watcher is not None:
                watcher.cancel()
            sub.writer = None
            sub.write_now = None
            sub.cycle = None
            self._state.hub.unregister(sub)

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._sub.close("disconnected")

    async def _send(self, send: Send, message: dict[str, Any]) -> None:
        """One ``send``, timed for the hub's ticker, which cancels one that a
        reader leaves stuck (``Hub.tick``)."""
        sub = self._sub
        sub.sending_since = time.monotonic()
        await send(message)
        sub.sending_since = 0.0
        sub.last_write = time.monotonic()
        sub.heartbeat_due = False

    def _write_now(self, chunk: bytes) -> bool:
        """Write ``chunk`` (HTTP-framed) to the socket now, if it takes bytes now.

        The writer task is parked, so nothing else is writing; a paused transport
        (the reader's buffer is full) or a gone client is left to the writer task,
        which waits for the one and ends on the other.
        """
        cycle = self._sub.cycle
        if cycle is None or cycle.flow.write_paused or cycle.disconnected:
            return False
        try:
            cycle.transport.write(chunk)
        except (OSError, RuntimeError):
            return False  # closing: the writer task ends the stream
        return True

    async def _write(self, send: Send, chunk: bytes) -> None:
        await self._send(send, {"type": "http.response.body", "body": chunk, "more_body": True})

    async def _begin(self, send: Send) -> None:
        """The retry line, what the client missed, then ``ssehub.live``.

        What it missed: the events fanned out before the stream registered,
        above its resume position, replayed from the log; nothing if its
        position is at or above the subscriber's (every later event comes live:
        a reconnect storm costs no query per stream); ``ssehub.reset`` if no id
        this database ever issued reaches it (a restore), and on from the head.
        Without a replay, it is all one write."""
        sub = self._sub
        frames = [RETRY]
        replayed = 0
        position = self._resume_from
        if position is not None and position < sub.position:
            await self._write(send, RETRY)
            frames = []
            replayed = await self._replay(send, position)
        elif position is not None and position > sub.position:
            if position > await self._last_issued():
                reset = {"last_event_id": sub.position}
                frames.append(notice_frame("ssehub.reset", reset))
            else:
                sub.position = position  # in flight: it has them, live drops them
        if sub.closed is None:
            frames.append(notice_frame("ssehub.live", {"replayed": replayed}))
            # Then the presence lists; from here on their joins and leaves are queued.
            frames.append(await self._state.presence.snapshots(sub, sub.channels))
        if frames:
            await self._write(send, b"".join(frames))

    async def _end(self, send: Send) -> bool:
        """The stream must end: its last words (the expiry notice, or what is queued,
        such as ``ssehub.channel_removed``). Always True."""
        sub = self._sub
        if sub.closed == "expired":
            await self._write(send, notice_frame("ssehub.expired", {}))
        elif sub.outbox:
            await self._flush(send)
        return True

    async def _flush(self, send: Send) -> None:
        """All pending frames in one ``send``."""
        sub = self._sub
        ids, frames, times = sub.take()
        if not frames:
            return
        sub.position = max(sub.position, *ids)
        await self._write(send, frames[0] if len(frames) == 1 else b"".join(frames))
        self._state.metrics.deliveries.observe(
            time.time(), (at for event_id, at in zip(ids, times, strict=True) if event_id)
        )

    async def _last_issued(self) -> int:
        async with raw_connection(self._state.pool) as conn:
            return await last_issued_id(conn)

    async def _replay(self, send: Send, after: int) -> int:
        """Retained events after ``after`` from the log, page by page, each page
        one ``send``; returns how many. Afterwards queued live frames at or
        below the last replayed id are stale and dropped by ``Subscriber.take``."""
        sub = self._sub
        cursor, count = after, 0
        while sub.closed is None and sub.channels:
            # Read (or shared with the streams asking the same: ``app.realtime.replay``)
            # on a pooled connection only for the read: never held while a client reads.
            shared = await self._state.replays.page(sub.channels, cursor, self._state.hub.position)
            page = shared.page
            if shared.channels.issubset(sub.channels):
                events, frames = page.events, shared.frames()
            else:  # a channel revoked since the read is left out
                events = [e for e in page.events if e.channel_id in sub.channels]
                frames = b"".join(map(event_frame, events))
            chunk = self._gap_notices(page.gaps, cursor) + frames
            if chunk:
                await self._write(send, chunk)
            if page.events:
                cursor = page.events[-1].id
                count += len(events)
                self._state.metrics.deliveries.count(len(events))
            if not page.more:
                break
        sub.position = max(sub.position, cursor)
        return count

    def _gap_notices(self, gaps: list[Gap], cursor: int) -> bytes:
        """``ssehub.truncated`` for each channel the stream carries whose events
        past ``cursor`` retention removed, unless the stream told it already."""
        sub = self._sub
        return b"".join(
            notice_frame("ssehub.truncated", {"channel": gap.channel, "oldest_id": gap.oldest_id})
            for gap in gaps
            if gap.channel_id in sub.channels
            and sub.gap_to_tell(gap.channel_id, gap.pruned_through, cursor)
        )
