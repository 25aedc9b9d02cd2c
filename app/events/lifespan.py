"""Start and stop the event log's parts: the writer, the publish rights, retention,
and this instance's say in ``ssehub_enqueue``'s size limit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.events import enqueue_limit, retention
from app.events.publisher import Publisher
from app.events.rights import PublishRights


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    publisher = Publisher(settings.database_url, app.state.metrics, settings.behind_pgbouncer)
    publisher.start()
    app.state.publisher = publisher
    app.state.publish_rights = PublishRights(app.state.pool)
    interval = settings.retention_interval_seconds
    sweeper = asyncio.create_task(retention.run(app.state.pool, interval), name="retention")
    try:
        async with enqueue_limit.declared(app.state.pool, settings.max_event_bytes):
            yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await publisher.stop()
