"""Replay pages that many streams ask for at once are read, and framed, once.

After a deploy or a failover, thousands of clients of the same channels
reconnect within a second, all resuming from about the same id: each replay
was a query of its own, and each framed the same events again. Here the
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
dropped as a duplicate when the live frames come (``Subscriber.take``), as for
a page of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.db import raw_connection
from app.events.log import Page, read_page
from app.realtime.hub import Hub
from app.realtime.sse import event_frame

FRESH_SECONDS = 1.0
MAX_PAGES = 1024


@dataclass(slots=True)
class SharedPage:
    page: Page
    channels: frozenset[int]
    _frames: bytes | None = field(default=None)

    def frames(self) -> bytes:
        """All the page's events as frames, made by the first stream that wants them."""
        if self._frames is None:
            self._frames = b"".join(map(event_frame, self.page.events))
        return self._frames


@dataclass(slots=True)
class _Read:
    done: asyncio.Future[SharedPage]
    covers: int  # the hub's position when the read began
    at: float


class SharedPages:
    def __init__(self, pool: Any, hub: Hub) -> None:
        self._pool = pool
        self._hub = hub
        self._reads: dict[tuple[tuple[int, ...], int], _Read] = {}

    async def page(self, channel_ids: Sequence[int], after: int, registered_at: int) -> SharedPage:
        """The page of ``channel_ids`` after ``after``, for a stream that registered
        with the hub at position ``registered_at``."""
        key = (tuple(sorted(channel_ids)), after)
        now = time.monotonic()
        read = self._reads.get(key)
        if read is None or read.covers < registered_at or now - read.at > FRESH_SECONDS:
            read = self._start(key, now)
        return await asyncio.shield(read.done)

    def _start(self, key: tuple[tuple[int, ...], int], now: float) -> _Read:
        if len(self._reads) >= MAX_PAGES:
            self._forget_stale(now)
        loop = asyncio.get_running_loop()
        read = _Read(loop.create_future(), self._hub.position, now)
        self._reads[key] = read
        task = loop.create_task(self._read(key, read))
        task.add_done_callback(_consume)
        return read

    async def _read(self, key: tuple[tuple[int, ...], int], read: _Read) -> None:
        try:
            async with raw_connection(self._pool) as conn:
                page = await read_page(conn, key[0], key[1])
        except Exception as exc:
            if self._reads.get(key) is read:
                del self._reads[key]  # a failure is nobody's answer for later
            read.done.set_exception(exc)
            read.done.exception()  # retrieved: the askers re-raise it
            return
        read.done.set_result(SharedPage(page, frozenset(key[0])))

    def _forget_stale(self, now: float) -> None:
        for key, read in list(self._reads.items()):
            if read.done.done() and now - read.at > FRESH_SECONDS:
                del self._reads[key]
        if len(self._reads) >= MAX_PAGES:
            self._reads.clear()


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
