"""The usual FastAPI SSE tutorial, as a baseline: an in-memory dict of
channel -> set of queues, JSON-encoded per subscriber, sse-starlette for the
response. No auth, no persistence, no resume.

Run: uvicorn bench.baseline.app:app --port 8100
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

app = FastAPI()
channels: defaultdict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
next_id = 0


@app.post("/publish/{channel}")
async def publish(channel: str, request: Request) -> dict[str, int]:
    global next_id
    body = await request.json()
    next_id += 1
    event = {
        "id": next_id,
        "channel": channel,
        "type": body.get("type", "message"),
        "data": body.get("data"),
    }
    for queue in channels[channel]:
        queue.put_nowait(event)
    return {"id": next_id}


@app.get("/stream/{channel}")
async def stream(channel: str, request: Request) -> EventSourceResponse:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    channels[channel].add(queue)

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            while True:
                event = await queue.get()
                yield {"id": str(event["id"]), "event": event["type"], "data": json.dumps(event)}
        finally:
            channels[channel].discard(queue)

    return EventSourceResponse(events())
