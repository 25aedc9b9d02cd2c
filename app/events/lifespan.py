"""Start and stop the event log's parts: the writer, the publish rights, retention."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.db import raw_connection
from app.events import inbox, retention
from app.events.publisher import Publisher
from app.events.rights import PublishRights


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    async with raw_connection(app.state.pool) as conn:
        await inbox.publish_limits(conn, settings.max_event_bytes)
    publisher = Publisher(settings.database_url, app.state.metrics, settings.behind_pgbouncer)
    publisher.start()
    app.state.publisher = publisher
    app.state.publish_rights = PublishRights(app.state.pool)
    interval = settings.retention_interval_seconds
    sweeper = asyncio.create_task(retention.run(app.state.pool, interval), name="retention")
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await publisher.stop()
