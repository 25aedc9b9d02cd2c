"""Replay pages that many streams ask for at once are read, and framed, once.

After a deploy or a failover, thousands of clients of the same channels
reconnect within a second, all resuming from about the same id: a query
per replay would read, and frame, the same events thousands of times. Here the
first stream to ask for a page (its channels, after an id) reads it; those
asking the same while it is being read, or within ``FRESH_SECONDS`` after,
share the read and the frames.

**Why a shared page is a complete replay.** A stream registers with the hub
before it replays (``app.realtime.stream``), at the hub's position then: every
event up to that position was already fanned out (so visible in the log), and
every later one reaches it live. A page read when the hub's position was P
holds every event of its range up to P. So it serves any stream that
registered at a position up to P (``covers``); a stream registered later asks
for a fresh read. Anything the page holds beyond a stream's position is
dropped as a duplicate when the live frames come (``Stream.take``), as for
a page of its own.

**Why the pages held stay few.** A page is worth keeping only while it may be
shared, ``FRESH_SECONDS``; resumes from ever new positions (each a page nobody
else asks for) must not make the process keep one per position. So pages are
kept oldest first and dropped as they age (on each insert, and by one timer
while any are kept), and the pages held never weigh more than ``MAX_BYTES``
together: past it the oldest go first. A dropped page is only a read more;
the streams reading it keep their own reference until they have written it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from app.db import raw_connection
from app.events.log import Page, read_page
from app.realtime.hub import Hub
from app.realtime.sse import event_frame

FRESH_SECONDS = 1.0
# What the shared pages may hold together: a reconnect storm resumes from a few
# positions, and a page weighs one to three MiB (its events and their frames).
MAX_BYTES = 32 * 1024 * 1024
# What an event weighs besides its data, as read: the object and its id, channel,
# type and time (about 370 bytes, measured with sys.getsizeof), and its list slot.
EVENT_BYTES = 400
PAGE_BYTES = 1024  # an empty page, its gaps and its entry: so even those are bounded
Key = tuple[tuple[int, ...], int]


@dataclass(slots=True)
class SharedPage:
    page: Page
    channels: frozenset[int]
    _frames: bytes | None = field(default=None)

    def frames(self) -> bytes:
        """All the page's events as frames, made once for every stream that wants them."""
        if self._frames is None:
            self._frames = b"".join(map(event_frame, self.page.events))
        return self._frames

    def weight(self) -> int:
        """About how many bytes the page holds, its frames included."""
        events = self.page.events
        data = sum(len(event.data) for event in events)
        return PAGE_BYTES + data + EVENT_BYTES * len(events) + len(self.frames())


@dataclass(slots=True)
class _Read:
    done: asyncio.Future[SharedPage]
    covers: int  # the hub's position when the read began
    at: float
    weight: int = 0  # counted in ``SharedPages.held`` once the read is done and kept


class SharedPages:
    def __init__(self, pool: Any, hub: Hub) -> None:
        self._pool = pool
        self._hub = hub
        self._reads: dict[Key, _Read] = {}  # oldest first
        self.held = 0  # bytes of the finished pages kept
        self._expiry: asyncio.TimerHandle | None = None

    async def page(
        self, channel_ids: Collection[int], after: int, registered_at: int
    ) -> SharedPage:
        """The page of ``channel_ids`` after ``after``, for a stream that registered
        with the hub at position ``registered_at``."""
        key = (tuple(sorted(channel_ids)), after)
        now = time.monotonic()
        self._expire(now)
        read = self._reads.get(key)
        if read is None or read.covers < registered_at:
            read = self._start(key, now)
        return await asyncio.shield(read.done)

    def _start(self, key: Key, now: float) -> _Read:
        loop = asyncio.get_running_loop()
        read = _Read(loop.create_future(), self._hub.position, now)
        self._forget(key)  # re-inserted at the end: the dict stays oldest first
        self._reads[key] = read
        task = loop.create_task(self._read(key, read))
        task.add_done_callback(_consume)
        if self._expiry is None:
            self._expiry = loop.call_later(FRESH_SECONDS, self._expire_later)
        return read

    async def _read(self, key: Key, read: _Read) -> None:
        try:
            async with raw_connection(self._pool) as conn:
                page = await read_page(conn, key[0], key[1])
        except Exception as exc:
            if self._reads.get(key) is read:
                del self._reads[key]  # a failure is nobody's answer for later
            read.done.set_exception(exc)
            read.done.exception()  # retrieved: the askers re-raise it
            return
        shared = SharedPage(page, frozenset(key[0]))
        if self._reads.get(key) is read:  # still kept: count it, within the bound
            read.weight = shared.weight()
            self.held += read.weight
            self._shrink()
        read.done.set_result(shared)

    def _forget(self, key: Key) -> None:
        read = self._reads.pop(key, None)
        if read is not None:
            self.held -= read.weight

    def _expire(self, now: float) -> None:
        """Drop the pages too old to be shared (all at the front: oldest first)."""
        for key, read in list(self._reads.items()):
            if now - read.at <= FRESH_SECONDS:
                break
            self._forget(key)

    def _expire_later(self) -> None:
        """The timer: age out what no insert came to age out, while anything is kept."""
        self._expiry = None
        self._expire(time.monotonic())
        if self._reads:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(FRESH_SECONDS, self._expire_later)

    def _shrink(self) -> None:
        """Drop the oldest finished pages until the rest fit in ``MAX_BYTES``."""
        for key, read in list(self._reads.items()):
            if self.held <= MAX_BYTES:
                break
            if read.weight:
                self._forget(key)


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
