"""``GET /stream`` and ``GET /channels/{name}/stream``.

Everything that can fail (credentials 401, an unreadable channel 404, a bad
resume position 400, too many streams 429) fails here, before the stream
starts; the one query it needs (``stream_access``, usually remembered:
``app.realtime.access``) returns its connection before streaming.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request, Response

from app.auth.deps import StreamCaller
from app.auth.identity import Caller
from app.errors import BadRequest
from app.realtime.stream import EventStream, Stream
from app.runtime import runtime

router = APIRouter(tags=["streams"])
_EVENT_ID = re.compile(r"[0-9]{1,19}")
MAX_EVENT_ID = 2**63 - 1
# One frame, as OpenAPI 3.2's ``itemSchema`` describes an event (FastAPI writes the
# same for its own SSE routes); ``schema`` is then the whole stream, as a list of them.
SSE_FRAME = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
# The routes' ``response_class`` is plain ``Response`` (no media type) so that FastAPI
# documents the 200 only as below and the errors as JSON, which they are; the
# endpoints return an ``EventStream`` themselves.
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An SSE stream",
        "content": {
            "text/event-stream": {
                "itemSchema": SSE_FRAME,
                "schema": {"type": "array", "items": SSE_FRAME},
            }
        },
    }
}


def resume_position(request: Request) -> int | None:
    """``Last-Event-ID`` (what EventSource sends on reconnect) wins over ``?last_event_id=``."""
    raw = request.headers.get("last-event-id", "").strip()
    if not raw:
        raw = request.query_params.get("last_event_id", "").strip()
    if not raw:
        return None
    if not _EVENT_ID.fullmatch(raw) or int(raw) > MAX_EVENT_ID:
        raise BadRequest("Last-Event-ID must be an event id: a non-negative integer")
    return int(raw)


async def _open(
    request: Request, caller: Caller, name: str | None, position: int | None
) -> EventStream:
    state = runtime(request)
    user_id = caller.user()
    access, as_of = await state.stream_access.get(state.pool, user_id, name)
    # From here to the comparison below, no wait: see app.realtime.access.
    channels = dict(access.channels)  # the stream's own: it changes as it lives
    stream = Stream(
        user_id,
        channels,
        name is None,
        caller.expires_at,
        position,
        hub=state.hub,
        replays=state.replays,
        pool=state.pool,
        metrics=state.metrics,
        presence=state.presence,
    )
    state.hub.register(stream)  # at the hub's position, before any replay: app.realtime.stream
    if as_of != state.stream_access.generation:
        # A hint was applied since the answer was read, and its re-check may
        # have looked at the streams before this one registered.
        state.listener.recheck_streams_of(user_id)
    return EventStream(stream)


@router.get("/stream", status_code=200, response_class=Response, responses=STREAM_RESPONSE)
async def stream_subscriptions(request: Request, caller: StreamCaller) -> EventStream:
    """Events of every channel the caller is subscribed to, and of their personal
    channel, following changes live."""
    position = resume_position(request)  # a bad one is a 400 before any database work
    return await _open(request, caller, None, position)


@router.get(
    "/channels/{name}/stream",
    status_code=200,
    response_class=Response,
    responses=STREAM_RESPONSE,
)
async def stream_channel(name: str, request: Request, caller: StreamCaller) -> EventStream:
    """Events of one channel the caller can read."""
    position = resume_position(request)
    return await _open(request, caller, name, position)
