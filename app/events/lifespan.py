"""Start and stop the event log's parts: the writer, the publish rights, retention."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.events import retention
from app.events.publisher import Publisher
from app.events.rights import PublishRights


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    publisher = Publisher(app.state.settings.database_url, app.state.metrics)
    publisher.start()
    app.state.publisher = publisher
    app.state.publish_rights = PublishRights(app.state.pool)
    interval = app.state.settings.retention_interval_seconds
    sweeper = asyncio.create_task(retention.run(app.state.pool, interval), name="retention")
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await publisher.stop()
