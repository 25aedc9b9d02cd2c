"""The hot endpoints, dispatched without FastAPI's per-request machinery.

Publishing and the two stream endpoints carry the load. Through FastAPI's
routing, dependency solving and exception wrapping a publish spends more
than half of its CPU before reaching our code; every open stream would hold
that machinery's per-request state for its whole life, and every frame it
wrote would go through the middlewares' ``send`` wrappers. ``HotPaths`` sits in front
of the FastAPI app (only CORS and trusted proxies, when configured, are in
front of it), parses each request's route once with ``app.route_table`` (the
one table of the hot URLs, which the body limit reads too), and calls the very
endpoint functions the FastAPI routes declare for those four, each through one
handler in ``HANDLERS`` that resolves their few parameters itself: there is one
implementation of each endpoint, and OpenAPI and ``/docs`` still describe it.
Everything else, the lifespan included, goes on to FastAPI.

Bodies are bounded by ``app.limits.BodyLimit``, given the parsed route, on
both ways on: to FastAPI, and to the publish endpoints. A stream's request goes
straight to its endpoint: its body is never read, and an open stream, alive for
hours, then keeps one coroutine frame fewer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.auth.deps import publisher_caller, stream_caller
from app.auth.identity import Caller
from app.config import Settings
from app.errors import SsehubError, error_response, render_error, unexpected_error
from app.events import routes as events
from app.limits import BodyLimit
from app.realtime import routes as streams
from app.route_table import Endpoint, Route, parse_route
from app.runtime import runtime

log = logging.getLogger("ssehub")
Handler = Callable[[Request, str], Awaitable[Response]]
PublishEndpoint = Callable[[str, Request, Settings, Caller, str | None], Awaitable[Response]]


async def _publish(request: Request, name: str) -> Response:
    return await _publishing(events.publish, request, name)


async def _publish_batch(request: Request, name: str) -> Response:
    return await _publishing(events.publish_batch, request, name)


async def _publishing(endpoint: PublishEndpoint, request: Request, name: str) -> Response:
    """Call a publish endpoint with what FastAPI would resolve for it."""
    caller = await publisher_caller(request)
    key = request.headers.get("idempotency-key")
    return await endpoint(name, request, runtime(request).settings, caller, key)


async def _stream_channel(request: Request, name: str) -> Response:
    return await streams.stream_channel(name, request, await stream_caller(request))


async def _stream_subscriptions(request: Request, _name: str) -> Response:
    return await streams.stream_subscriptions(request, await stream_caller(request))


HANDLERS: dict[Endpoint, Handler] = {
    Endpoint.PUBLISH: _publish,
    Endpoint.PUBLISH_BATCH: _publish_batch,
    Endpoint.STREAM_CHANNEL: _stream_channel,
    Endpoint.STREAM_SUBSCRIPTIONS: _stream_subscriptions,
}


class HotPaths:
    """The outermost app layer of ours: parses each request's route once
    (``app.route_table``) and serves it, or bounds its body and hands it on
    to FastAPI."""

    def __init__(self, app: FastAPI, body_limit: BodyLimit) -> None:
        self.app = app
        self._body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan
            await self.app(scope, receive, send)
            return
        route = parse_route(scope["method"], scope["path"])
        if not route.hot or scope.get("root_path"):
            # Under a root_path the path carries it: FastAPI, which strips it, routes.
            await self._body_limit.run(self.app, route, scope, receive, send)
        elif route.stream:
            # ``_serve`` inlined: the stream lives on in this frame, for hours; keep
            # no other frame alive with it.
            scope["app"] = self.app
            response = await _respond(HANDLERS[route.endpoint], Request(scope, receive), route.name)
            await response(scope, receive, send)
        else:
            await self._body_limit.run(partial(self._serve, route), route, scope, receive, send)

    async def _serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self.app  # what ``request.app`` is, as under FastAPI
        response = await _respond(HANDLERS[route.endpoint], Request(scope, receive), route.name)
        await response(scope, receive, send)


async def _respond(endpoint: Handler, request: Request, name: str) -> Response:
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
