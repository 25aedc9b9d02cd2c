"""The tutorial baseline with only the streaming response changed: a lean raw
ASGI response instead of sse-starlette. Same dict of channel -> subscribers,
same publish route, no auth, no persistence.

What differs, and why it is measured: each event is encoded once and the
bytes are shared by every subscriber; each stream is one task (sse-starlette
runs a task group of four); when a stream has several frames pending they go
out in one ``send``. Side by side with ``app.py`` this isolates the cost of
the response from everything else ssehub does.

Run: uvicorn bench.baseline.lean:app --port 8101
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response


class Outbox:
    """Frames waiting for one stream, and a flag that wakes its single task."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.ready = asyncio.Event()

    def put(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.ready.set()


app = FastAPI()
channels: defaultdict[str, set[Outbox]] = defaultdict(set)
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
    frame = f"id: {next_id}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
    for outbox in channels[channel]:
        outbox.put(frame)
    return {"id": next_id}


class LeanStream(Response):
    """A raw ASGI streaming response: one writer task, all pending frames in one
    send (plus a watcher that only waits for the client's disconnect)."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        outbox = Outbox()
        channels[self.channel].add(outbox)
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            outbox.ready.set()

        watcher = asyncio.create_task(watch())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b": ok\n\n", "more_body": True})
            while not gone:
                await outbox.ready.wait()
                outbox.ready.clear()
                frames, outbox.frames = outbox.frames, []
                await send(
                    {"type": "http.response.body", "body": b"".join(frames), "more_body": True}
                )
        except OSError:
            pass  # the client went away
        finally:
            watcher.cancel()
            channels[self.channel].discard(outbox)


@app.get("/stream/{channel}")
async def stream(channel: str) -> LeanStream:
    return LeanStream(channel)
