"""``GET /stream`` and ``GET /channels/{name}/stream``.

Everything that can fail (credentials 401, an unreadable channel 404, a bad
resume position 400, too many streams 429) fails here, before the stream
starts; the database session used for it is closed before streaming.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request

from app.auth.deps import StreamCaller, StreamCallerDep
from app.channels.service import get_readable_channel, subscribed_channels
from app.errors import BadRequest
from app.realtime.stream import EventStream
from app.realtime.subscriber import Subscriber

router = APIRouter(tags=["streams"])
_EVENT_ID = re.compile(r"[0-9]{1,19}")
MAX_EVENT_ID = 2**63 - 1
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "An SSE stream"}
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


def _open(
    request: Request,
    caller: StreamCaller,
    channels: dict[int, str],
    follows: bool,
    position: int | None,
) -> EventStream:
    state = request.app.state
    sub = Subscriber(caller.user_id, caller.is_admin, channels, follows)
    sub.position = state.hub.position
    state.hub.register(sub)  # before any replay: see app.realtime.stream
    return EventStream(state, sub, position, caller.expires_at)


@router.get("/stream", status_code=200, response_class=EventStream, responses=STREAM_RESPONSE)
async def stream_subscriptions(request: Request, caller: StreamCallerDep) -> EventStream:
    """Events of every channel the caller is subscribed to, following changes live."""
    position = resume_position(request)  # a bad one is a 400 before any database work
    async with request.app.state.sessionmaker() as session:
        channels = await subscribed_channels(session, caller.user_id, caller.is_admin)
    return _open(request, caller, {c.id: c.name for c in channels}, True, position)


@router.get(
    "/channels/{name}/stream",
    status_code=200,
    response_class=EventStream,
    responses=STREAM_RESPONSE,
)
async def stream_channel(name: str, request: Request, caller: StreamCallerDep) -> EventStream:
    """Events of one channel the caller can read."""
    position = resume_position(request)
    async with request.app.state.sessionmaker() as session:
        channel = await get_readable_channel(session, caller.user_id, caller.is_admin, name)
    return _open(request, caller, {channel.id: channel.name}, False, position)
