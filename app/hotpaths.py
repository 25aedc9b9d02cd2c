"""The hot endpoints, dispatched without FastAPI's per-request machinery.

Publishing and the two stream endpoints carry the load. Through FastAPI's
routing, dependency solving and exception wrapping a publish spends more
than half of its CPU before reaching our code; every open stream would hold
that machinery's per-request state for its whole life, and every frame it
wrote would go through the middlewares' ``send`` wrappers. ``HotPaths`` sits in front
of the FastAPI app (only CORS and trusted proxies, when configured, are in
front of it), matches exactly those four routes and calls the very endpoint
functions the FastAPI routes declare, resolving their few parameters itself:
there is one implementation of each endpoint, and OpenAPI and ``/docs`` still
describe it. Everything else, the lifespan included, goes on to FastAPI.

Bodies are bounded by ``app.limits.BodyLimit`` (``limited``) on both ways on:
to FastAPI, and to the publish endpoints. A stream's request goes straight to
its endpoint: its body is never read, and an open stream, alive for hours,
then keeps one coroutine frame fewer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth.deps import publisher_caller, stream_caller
from app.errors import SsehubError, error_response, render_error, unexpected_error
from app.events import routes as events
from app.realtime import routes as streams

log = logging.getLogger("ssehub")
Endpoint = Callable[[Request, str], Awaitable[Response]]


async def _publish(request: Request, name: str) -> Response:
    caller = await publisher_caller(request)
    key = request.headers.get("idempotency-key")
    return await events.publish(name, request, request.app.state.settings, caller, key)


async def _publish_batch(request: Request, name: str) -> Response:
    caller = await publisher_caller(request)
    key = request.headers.get("idempotency-key")
    return await events.publish_batch(name, request, request.app.state.settings, caller, key)


async def _stream_channel(request: Request, name: str) -> Response:
    return await streams.stream_channel(name, request, await stream_caller(request))


async def _stream_subscriptions(request: Request, _name: str) -> Response:
    return await streams.stream_subscriptions(request, await stream_caller(request))


def route(method: str, path: str) -> tuple[Endpoint, str] | None:
    """The hot endpoint for a request, with its ``{name}``, or None."""
    if method == "GET" and path == "/stream":
        return _stream_subscriptions, ""
    parts = path.split("/")
    # "", "channels", name, "events" | "stream" [, "batch"]
    if len(parts) < 4 or parts[1] != "channels" or not parts[2]:
        return None
    name, rest = parts[2], parts[3:]
    if method == "POST" and rest == ["events"]:
        return _publish, name
    if method == "POST" and rest == ["events", "batch"]:
        return _publish_batch, name
    if method == "GET" and rest == ["stream"]:
        return _stream_channel, name
    return None


STREAMS = (_stream_channel, _stream_subscriptions)


class HotPaths:
    def __init__(self, app: FastAPI, limited: Callable[[ASGIApp], ASGIApp]) -> None:
        self.app = app
        self._rest = limited(app)
        self._publish = limited(self._serve)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = route(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if found is None or scope.get("root_path"):
            await self._rest(scope, receive, send)
        elif found[0] in STREAMS:
            scope["app"] = self.app  # what ``request.app`` is, as under FastAPI
            response = await _respond(found[0], Request(scope, receive), found[1])
            # The stream lives on in this frame: keep nothing else alive with it.
            await response(scope, receive, send)
        else:
            await self._publish(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = route(scope["method"], scope["path"])
        assert found is not None
        scope["app"] = self.app
        response = await _respond(found[0], Request(scope, receive), found[1])
        await response(scope, receive, send)


async def _respond(endpoint: Endpoint, request: Request, name: str) -> Response:
    """The endpoint's response, or the error response FastAPI's handlers would
    give (a bug included: logged, and a JSON 500 like every other error)."""
    try:
        return await endpoint(request, name)
    except (SsehubError, RequestValidationError) as exc:
        return render_error(exc)
    except HTTPException as exc:  # e.g. a body past its limit (app.limits), raised by receive
        return error_response(exc.status_code, exc.detail, exc.headers)
    except ClientDisconnect:
        # The body never came whole: the client left, or the server protocol
        # answered 408 for it (``app.limits``). Nobody reads what is sent now.
        return Response(status_code=400)
    except Exception as exc:
        return unexpected_error(exc, f"{request.method} {request.url.path}")
