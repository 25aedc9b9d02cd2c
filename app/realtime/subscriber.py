"""One open stream as the hub sees it: what it carries, where it is, its outbox.

The hub never waits for a subscriber: ``offer`` appends to a bounded outbox
and wakes the stream's writer. A reader too slow to keep the outbox under its
bound is not allowed to hold more memory: the outbox is dropped and the
subscriber marked ``lagging``; its writer then catches up from the event log
from its position, exactly as a resume does, and goes live again.

The hub hands each run of a page's events on one channel to every subscriber
of the channel, framed once as the bytes its socket needs (``write_run``). A
stream whose writer is idle (parked in ``wait``, nothing queued) has them
written straight to its socket through ``write_now``, without waking the
writer task: under a 10,000-way fan-out the wake-up, the task switch and the
writer's loop cost more than the write itself. ``write_now`` either writes
all of it or nothing (see ``app.realtime.stream``); when it writes nothing
the events are offered to the outbox and the writer is woken as usual.

A subscriber keeps no timer of its own. Heartbeats, token expiry and sends
stuck on a reader that takes no bytes are all found by the hub's one ticker
(``Hub.tick``), which reads the times kept here: a timer per stream and per
wait, with a timeout per send, would cost a third of the CPU of a 10,000-way
fan-out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

MAX_OUTBOX_FRAMES = 1000
MAX_OUTBOX_BYTES = 4 * 1024 * 1024


@dataclass(eq=False, slots=True)
class Subscriber:
    user_id: int
    is_admin: bool
    channels: dict[int, str]  # id -> name of the channels it carries
    follows_subscriptions: bool  # GET /stream: changes with the user's subscriptions
    expires_at: float = float("inf")  # wall clock: when the token expires
    position: int = 0  # highest event id handed to the writer; live frames at or below it are stale
    lagging: bool = False
    heartbeat_due: bool = False
    closed: str | None = None  # why the stream must end, once it must
    # The outbox as three parallel lists, so queueing allocates nothing; an empty
    # tuple while nothing is queued (most streams, most of the time), so an idle
    # stream holds no lists at all (``_queue``). The frame
    # (shared by every subscriber), the event id (0 for a notice) and the publish
    # timestamp (0 for a notice).
    outbox: list[bytes] | tuple[()] = ()
    outbox_ids: list[int] | tuple[()] = ()
    outbox_times: list[float] | tuple[()] = ()
    outbox_bytes: int = 0
    last_write: float = field(default_factory=time.monotonic)
    sending_since: float = 0.0  # monotonic start of the send in progress, 0 if none
    writer: asyncio.Task[None] | None = None  # the task writing the stream
    # Writes bytes ready for the socket (``sse.http_chunk``) at once if it takes them
    # now, else writes nothing and returns False; None where the server cannot.
    write_now: Callable[[bytes], bool] | None = None
    # uvicorn's response cycle, where frames may be written straight to its
    # transport; the hub's ticker reads ``disconnected`` on it (``Hub.tick``).
    cycle: Any = None
    # Per channel, the ``pruned_through`` of the last ``ssehub.truncated`` sent, so
    # one gap is told once however many pages and catch-ups see it.
    noticed_gaps: dict[int, int] | None = None
    _waiter: asyncio.Future[None] | None = None

    def offer(self, event_id: int, frame: bytes, published_at: float) -> bool:
        """Queue a live event and wake the writer, without waiting; True if the
        outbox overflowed (the stream now catches up from the log instead)."""
        if self.lagging or self.closed or event_id <= self.position:
            return False  # nothing to do; at or below the position it is stale
        if len(self.outbox) >= MAX_OUTBOX_FRAMES or self.outbox_bytes > MAX_OUTBOX_BYTES:
            self.catch_up()
            return True
        self._queue(frame, event_id, published_at)
        self.outbox_bytes += len(frame)
        self.wake()
        return False

    def write_run(self, chunk: bytes, first_id: int, last_id: int, now: float) -> bool:
        """Write a run of live events straight to the socket, if nothing must go
        before them: the writer parked with an empty outbox, none of the ids at or
        below the position, and the socket taking bytes now. ``chunk`` is their
        frames as the socket needs them, shared by every subscriber of the
        channel; ``now`` is ``time.monotonic()``. False means nothing was written:
        the caller then offers the events one by one."""
        waiter = self._waiter
        write_now = self.write_now
        if (
            write_now is None
            or waiter is None
            or waiter.done()
            or self.outbox
            or first_id <= self.position
            or self.lagging
            or self.closed
            or not write_now(chunk)
        ):
            return False
        self.position = last_id
        self.last_write = now
        return True

    def catch_up(self) -> None:
        """Stop taking live events: the writer reads them from the log, from the
        position, as a resume does. Queued events are dropped (the log has them);
        queued notices are kept."""
        self.lagging = True
        if any(self.outbox_ids):
            queued = zip(self.outbox, self.outbox_ids, strict=True)
            notices = [frame for frame, event_id in queued if not event_id]
            self.outbox, self.outbox_ids, self.outbox_times = (), (), ()
            self.outbox_bytes = 0
            for frame in notices:
                self._queue(frame, 0, 0.0)
        self.wake()

    def gap_to_tell(self, channel_id: int, pruned_through: int, after: int) -> bool:
        """Whether a gap (events of ``channel_id`` at or below ``pruned_through``
        removed) is news to a stream that has delivered everything up to ``after``;
        if it is, it is remembered as told."""
        told = self.noticed_gaps.get(channel_id, 0) if self.noticed_gaps else 0
        if pruned_through <= max(after, told):
            return False
        if self.noticed_gaps is None:
            self.noticed_gaps = {}
        self.noticed_gaps[channel_id] = pruned_through
        return True

    def notify(self, frame: bytes) -> None:
        """Queue a notice (never dropped by the bound: notices are few and small)."""
        self._queue(frame, 0, 0.0)
        self.wake()

    def disconnected(self) -> None:
        self.close("disconnected")

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
        self.wake()

    def _queue(self, frame: bytes, event_id: int, published_at: float) -> None:
        if not isinstance(self.outbox, list):
            self.outbox, self.outbox_ids, self.outbox_times = [], [], []
        self.outbox.append(frame)
        self.outbox_ids.append(event_id)  # type: ignore[union-attr]
        self.outbox_times.append(published_at)  # type: ignore[union-attr]

    def take(self) -> tuple[list[int], list[bytes], list[float]]:
        """Everything queued that is not stale (ids, frames, timestamps), emptying the outbox."""
        ids, frames, times = self.outbox_ids, self.outbox, self.outbox_times
        if not isinstance(ids, list) or not isinstance(frames, list) or not isinstance(times, list):
            return [], [], []
        self.outbox, self.outbox_ids, self.outbox_times = (), (), ()
        self.outbox_bytes = 0
        position = self.position
        if any(0 < event_id <= position for event_id in ids):  # only right after a replay
            keep = [n for n, event_id in enumerate(ids) if event_id == 0 or event_id > position]
            ids = [ids[n] for n in keep]
            frames = [frames[n] for n in keep]
            times = [times[n] for n in keep]
        return ids, frames, times

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wait(self) -> Awaitable[None]:
        """Until something is queued, a heartbeat is due or the stream must close.

        A bare future rather than a coroutine: a parked stream (most streams,
        most of the time) holds no frame for it. A done waiter is no waiter
        (``write_run``), so nothing needs resetting after it completes."""
        waiter = asyncio.get_running_loop().create_future()
        if self.outbox or self.lagging or self.closed or self.heartbeat_due:
            waiter.set_result(None)
        else:
            self._waiter = waiter
        return waiter
