"""One SSE response: a single writer that replays, then follows the live tail.

Why not sse-starlette's ``EventSourceResponse``: it runs four tasks per
stream and one ``send`` per frame. Here one writer task does everything and
writes all pending frames in one ``send``, so throughput rises with load; a
second small task only watches for the client going away. (Measured side by
side in docs/BENCHMARKS.md.)

The handoff from history to live is race-free, as in Mercure: the subscriber
is registered with the hub *before* the replay reads the log, so an event
committed at any moment is either read by the replay or queued live; queued
frames at or below the last replayed id are dropped as duplicates.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.db import raw_connection
from app.events.log import read_after, retention_state
from app.metrics import Metrics
from app.realtime.hub import Hub
from app.realtime.sse import HEARTBEAT, RETRY, event_frame, notice_frame
from app.realtime.subscriber import Subscriber

REPLAY_PAGE = 1000
SEND_TIMEOUT_SECONDS = 30.0
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        state: Any,
        sub: Subscriber,
        resume_from: int | None,
        expires_at: float,
    ) -> None:
        super().__init__(headers=HEADERS, media_type=self.media_type)
        # A stream has no length: drop the ``content-length: 0`` Response adds.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._hub: Hub = state.hub
        self._engine = state.engine
        self._metrics: Metrics = state.metrics
        self._heartbeat: float = state.settings.heartbeat_seconds
        self._sub = sub
        self._resume_from = resume_from
        self._expires_at = expires_at

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._run(send)
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (OSError, TimeoutError):
            pass  # the client went away, or stopped reading: it resumes with Last-Event-ID
        finally:
            watcher.cancel()
            self._hub.unregister(self._sub)

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._sub.close("disconnected")

    async def _write(self, send: Send, chunk: bytes) -> None:
        """One ``send``; a reader that takes no bytes for 30 s is let go."""
        try:
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TimeoutError:
            self._metrics.slow_reader_disconnects.inc()
            raise

    async def _run(self, send: Send) -> None:
        sub = self._sub
        await self._write(send, RETRY)
        replayed = 0
        if self._resume_from is not None:
            replayed = await self._replay(send, self._resume_from)
        await self._write(send, notice_frame("ssehub.live", {"replayed": replayed}))
        last_write = time.monotonic()
        while True:
            if sub.closed is not None:
                if sub.closed == "expired":
                    await self._write(send, notice_frame("ssehub.expired", {}))
                elif sub.outbox:  # e.g. the channel_removed notice before the end
                    await self._flush(send)
                return
            if sub.lagging:
                sub.lagging = False
                await self._replay(send, sub.position)
                last_write = time.monotonic()
                continue
            if sub.outbox:
                await self._flush(send)
                last_write = time.monotonic()
                continue
            now = time.monotonic()
            until_expiry = self._expires_at - time.time()
            if until_expiry <= 0:
                sub.close("expired")
                continue
            if now - last_write >= self._heartbeat:
                await self._write(send, HEARTBEAT)
                last_write = now
                continue
            await sub.wait(min(self._heartbeat - (now - last_write), until_expiry))

    async def _flush(self, send: Send) -> None:
        """All pending frames in one ``send``."""
        items = self._sub.take()
        if not items:
            return
        now = time.time()
        delivered = 0
        for event_id, _frame, published_at in items:
            if event_id:
                delivered += 1
                self._sub.position = max(self._sub.position, event_id)
                self._metrics.delivery_latency.observe(max(0.0, now - published_at))
        await self._write(send, b"".join(item[1] for item in items))
        if delivered:
            self._metrics.events_delivered.inc(delivered)

    async def _replay(self, send: Send, after: int) -> int:
        """Retained events after ``after`` from the log, page by page, each page
        one ``send``; returns how many. Afterwards queued live frames at or
        below the last replayed id are stale and dropped by ``Subscriber.take``."""
        sub = self._sub
        channel_ids = list(sub.channels)
        if not channel_ids:
            sub.position = max(sub.position, after)
            return 0
        async with raw_connection(self._engine) as conn:
            state = await retention_state(conn, channel_ids)
        notices = b"".join(
            notice_frame("ssehub.truncated", {"channel": sub.channels[cid], "oldest_id": oldest})
            for cid, (pruned_through, oldest) in state.items()
            if pruned_through > after and cid in sub.channels
        )
        if notices:
            await self._write(send, notices)
        cursor, count = after, 0
        while True:
            # A fresh connection per page: never hold one while a slow client reads.
            async with raw_connection(self._engine) as conn:
                page = await read_after(conn, channel_ids, cursor, REPLAY_PAGE)
            if page:
                await self._write(send, b"".join(event_frame(e) for e in page))
                cursor = page[-1].id
                count += len(page)
                self._metrics.events_delivered.inc(len(page))
            if len(page) < REPLAY_PAGE:
                break
        sub.position = max(sub.position, cursor)
        return count
