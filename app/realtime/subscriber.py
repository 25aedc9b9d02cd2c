"""One open stream as the hub sees it: what it carries, where it is, its outbox.

The hub never waits for a subscriber: ``offer`` appends to a bounded outbox
and wakes the stream's writer. A reader too slow to keep the outbox under its
bound is not allowed to hold more memory: the outbox is dropped and the
subscriber marked ``lagging``; its writer then catches up from the event log
from its position, exactly as a resume does, and goes live again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

MAX_OUTBOX_FRAMES = 1000
MAX_OUTBOX_BYTES = 4 * 1024 * 1024


@dataclass(eq=False, slots=True)
class Subscriber:
    user_id: int
    is_admin: bool
    channels: dict[int, str]  # id -> name of the channels it carries
    follows_subscriptions: bool  # GET /stream: changes with the user's subscriptions
    position: int = 0  # highest event id handed to the writer; live frames at or below it are stale
    lagging: bool = False
    closed: str | None = None  # why the stream must end, once it must
    # (event id or 0 for a notice, frame, published_at as a timestamp or 0)
    outbox: list[tuple[int, bytes, float]] = field(default_factory=list)
    outbox_bytes: int = 0
    _waiter: asyncio.Future[None] | None = None

    def offer(self, event_id: int, frame: bytes, published_at: float) -> bool:
        """Queue a live event without waiting; returns False if it overflowed."""
        if self.lagging or self.closed:
            return True
        if len(self.outbox) >= MAX_OUTBOX_FRAMES or self.outbox_bytes > MAX_OUTBOX_BYTES:
            self.lagging = True
            self.outbox.clear()
            self.outbox_bytes = 0
            self.wake()
            return False
        self.outbox.append((event_id, frame, published_at))
        self.outbox_bytes += len(frame)
        self.wake()
        return True

    def notify(self, frame: bytes) -> None:
        """Queue a notice (never dropped by the bound: notices are few and small)."""
        self.outbox.append((0, frame, 0.0))
        self.wake()

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
        self.wake()

    def take(self) -> list[tuple[int, bytes, float]]:
        """Everything queued that is not stale, emptying the outbox."""
        taken = [item for item in self.outbox if item[0] == 0 or item[0] > self.position]
        self.outbox = []
        self.outbox_bytes = 0
        return taken

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, at_most: float) -> None:
        """Until something is queued, the stream must close, or ``at_most`` seconds pass."""
        if self.outbox or self.lagging or self.closed:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(at_most, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
