"""Publishing (single and batch) and history of a channel.

A publish checks, in this order and before anything costly: the token, the
``Idempotency-Key``, the caller's right to publish to the channel
(``app.events.rights``), and only then reads and parses the body and hands it
to the ordered writer. So a caller who may not publish never gets its body
parsed and never delays the writer.

Responses are built from ``StoredEvent.to_json()`` so ``data`` goes out as
stored, byte for byte, without a decode/encode round trip.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.auth.deps import PublisherCaller, SettingsDep, UserCaller
from app.auth.identity import Caller
from app.auth.personal import personal_channel
from app.channels.service import history_channel
from app.db import raw_connection
from app.errors import BadRequest, Forbidden, Invalid, NotFound, PayloadTooLarge, Unauthorized
from app.events.log import Page, StoredEvent, read_page
from app.events.publisher import NewEvent, Publisher
from app.events.schemas import BatchIn, BatchOut, EventIn, EventOut, EventPage
from app.runtime import runtime
from app.text import Text, storable

router = APIRouter(tags=["events"])
JSON = "application/json"
M = TypeVar("M", bound=BaseModel)
MAX_IDEMPOTENCY_KEY = 200
# Checked in ``publish`` itself, which ``app.hotpaths`` calls without FastAPI; the
# schema still shows the limit.
IdempotencyKey = Annotated[
    str | None, Header(json_schema_extra={"minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY})
]
ChannelName = Annotated[Text, Path()]
Username = Annotated[Text, Path()]
After = Annotated[int, Query(ge=0, le=2**63 - 1)]
Limit = Annotated[int, Query(ge=1, le=1000)]


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body we parse ourselves (see ``app.events.schemas``)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {
        "requestBody": {"required": True, "content": {JSON: {"schema": schema}}},
    }


async def _read_json(request: Request) -> Any:
    """The raw body parsed by orjson, 400 if not JSON. Its size is bounded where it
    arrives (``app.limits.BodyLimit``: 413 past the batch or event limit)."""
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from exc


def _validate(model: type[M], value: Any) -> M:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from exc


def _new_event(event: EventIn, max_bytes: int) -> NewEvent:
    data = orjson.dumps(event.data)
    # The limit is in bytes: counting the decoded str let non-ASCII data through.
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"data is {len(data)} bytes as compact JSON; the limit is {max_bytes}"
        )
    return NewEvent(event.type, data.decode())


def _publisher(request: Request) -> Publisher:
    publisher = runtime(request).publisher
    return publisher


async def _may_publish(request: Request, caller: Caller, name: str) -> None:
    """Rights before work: 401/403/404 before the body is read (``app.events.rights``)."""
    rights = runtime(request).publish_rights
    await rights.check(caller, name)


def _idempotency_key(value: str | None) -> str | None:
    """The header's key: 400 if empty or not storable text, 422 if too long."""
    if value is None:
        return None
    if not value.strip():
        raise BadRequest("Idempotency-Key must not be empty")
    if len(value) > MAX_IDEMPOTENCY_KEY:
        raise Invalid(f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters")
    try:
        return storable(value)
    except ValueError as exc:
        raise BadRequest(f"Idempotency-Key {exc}") from exc


@router.post(
    "/channels/{name}/events",
    status_code=201,
    openapi_extra=_body_schema(EventIn),
    responses={
        201: {"model": EventOut, "description": "Published"},
        200: {"model": EventOut, "description": "An earlier publish with the same Idempotency-Key"},
    },
)
async def publish(
    name: str,
    request: Request,
    settings: SettingsDep,
    caller: PublisherCaller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Publish one event (admin, or an API key whose patterns match). Retrying with
    the same Idempotency-Key within 24 h answers 200 with the first event."""
    key = _idempotency_key(idempotency_key)
    await _may_publish(request, caller, name)
    body = _validate(EventIn, await _read_json(request))
    item = _new_event(body, settings.max_event_bytes)
    events, created = await _publisher(request).publish(caller, name, [item], key)
    return Response(events[0].to_json(), status_code=201 if created else 200, media_type=JSON)


@router.post(
    "/users/{username}/events",
    status_code=201,
    openapi_extra=_body_schema(EventIn),
    responses={
        201: {"model": EventOut, "description": "Published"},
        200: {"model": EventOut, "description": "An earlier publish with the same Idempotency-Key"},
    },
)
async def publish_to_user(
    username: Username,
    request: Request,
    settings: SettingsDep,
    caller: PublisherCaller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Push one event to a user's personal channel ``@USERNAME``, carried by every
    ``GET /stream`` of theirs (admin, or an API key whose patterns match ``@USERNAME``)."""
    try:
        return await publish(personal_channel(username), request, settings, caller, idempotency_key)
    except NotFound as exc:
        raise NotFound(f"User {username!r} not found") from exc


@router.post(
    "/channels/{name}/events/batch",
    status_code=201,
    openapi_extra=_body_schema(BatchIn),
    responses={
        201: {"model": BatchOut, "description": "Published, ids in the order given"},
        200: {
            "model": BatchOut,
            "description": "An earlier publish with the same Idempotency-Key: its events",
        },
    },
)
async def publish_batch(
    name: str,
    request: Request,
    settings: SettingsDep,
    caller: PublisherCaller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Publish 1 to 1000 events at once (admin, or an API key whose patterns match):
    all or nothing, ids in the order given. Retrying with the same Idempotency-Key
    within 24 h answers 200 with the first batch's events."""
    key = _idempotency_key(idempotency_key)
    await _may_publish(request, caller, name)
    body = _validate(BatchIn, await _read_json(request))
    items = [_new_event(e, settings.max_event_bytes) for e in body.events]
    events, created = await _publisher(request).publish(caller, name, items, key)
    return Response(
        b'{"events":' + _json_list(events) + b"}",
        status_code=201 if created else 200,
        media_type=JSON,
    )


@router.get(
    "/channels/{name}/events", responses={200: {"model": EventPage, "description": "A page"}}
)
async def history(
    name: ChannelName,
    request: Request,
    caller: PublisherCaller,
    after: After = 0,
    limit: Limit = 100,
) -> Response:
    """Retained events after ``after``, ascending (readers, or an API key whose
    patterns match); ``next_after`` is the cursor for the next page, or null when
    there is nothing more. A page holds at most ``limit`` events and about 1 MiB
    of data: follow ``next_after``."""
    if caller.api_key is not None and not caller.api_key.allows(name):
        raise Forbidden("This API key may not read this channel")
    async with raw_connection(runtime(request).pool) as conn:
        channel_id = await history_channel(conn, name, caller.user_id)
        page = await read_page(conn, [channel_id], after, limit)
    return _page_response(page)


@router.get("/me/events", responses={200: {"model": EventPage, "description": "A page"}})
async def my_events(
    request: Request, caller: UserCaller, after: After = 0, limit: Limit = 100
) -> Response:
    """The caller's personal history (``@USERNAME``), like a channel's."""
    async with raw_connection(runtime(request).pool) as conn:
        page = await read_page(
            conn, [await _personal_channel_id(conn, caller.user())], after, limit
        )
    return _page_response(page)


async def _personal_channel_id(conn: Any, user_id: int) -> int:
    channel_id = await conn.fetchval("SELECT id FROM public.channels WHERE owner_id = $1", user_id)
    if channel_id is None:
        raise Unauthorized("User no longer exists")
    return int(channel_id)


def _page_response(page: Page) -> Response:
    events = page.events
    next_after = str(events[-1].id).encode() if page.more and events else b"null"
    return Response(
        b'{"events":' + _json_list(events) + b',"next_after":' + next_after + b"}",
        media_type=JSON,
    )


def _json_list(events: list[StoredEvent]) -> bytes:
    return b"[" + b",".join(e.to_json() for e in events) + b"]"
