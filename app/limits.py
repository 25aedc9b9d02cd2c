"""Limits enforced where the bytes arrive, before any route sees them.

The contract's "Limits" section says what a hostile or broken client gets.
Each limit is kept by the first layer that sees the bytes it bounds, so no
route has to remember it and none can forget it:

- **Bodies** (``BodyLimit``): the first ASGI layer a request meets (after CORS,
  so a browser can read the 413). A declared ``Content-Length`` over the limit
  is refused before the app is called; a chunked body is counted as the app
  reads it and refused as soon as it crosses the limit.

Why not Starlette's ``RequestBodyLimitMiddleware`` or FastAPI's
``max_body_size``: both call the app before refusing a declared oversize body,
answer in plain text, keep the connection open (so uvicorn reads a 2 GB body
to throw it away), and FastAPI's is per route, while the hot paths
(``app.hotpaths``) never reach FastAPI's routing.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import error_response

KIB = 1024
FORM_BODY_BYTES = 16 * KIB  # the login form
ENVELOPE_BYTES = 16 * KIB  # a JSON body: room around one event's data
CLOSE = {"Connection": "close"}


def body_limit(method: str, path: str, settings: Settings) -> int:
    """The most bytes the body of this request may have (the contract's table)."""
    if method == "POST":
        if path == "/auth/token":
            return FORM_BODY_BYTES
        parts = path.split("/")
        # "", "channels", name, "events", "batch"
        if len(parts) == 5 and parts[1] == "channels" and parts[3:] == ["events", "batch"]:
            return settings.max_batch_bytes
    return settings.max_event_bytes + ENVELOPE_BYTES


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body crosses its limit.

    An ``HTTPException`` because FastAPI re-raises exactly those from its body
    reading (any other error there becomes a 400) and renders them with
    ``app.errors``; ``app.hotpaths`` renders it the same way. ``Connection:
    close`` makes uvicorn close the connection after the answer instead of
    reading the rest of the body to throw it away.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body larger than {limit} bytes", headers=CLOSE)


class BodyLimit:
    """Refuse a request body with 413 as soon as it crosses its limit.

    Only a chunked body is counted: the parser (llhttp, under uvicorn) hands
    the app at most ``Content-Length`` bytes as a request's body, and a request
    with neither header has none, so checking the declared length bounds
    every other body. This also leaves ``receive`` and ``send`` of all other
    requests untouched, which the streams' direct writes rely on
    (``app.realtime.stream.uvicorn_cycle`` needs uvicorn's own ``send``).
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope["method"], scope["path"], self.settings)
        declared, chunked = _body_headers(scope)
        if declared is not None and declared > limit:
            await _refusal(BodyTooLarge(limit))(scope, receive, send)
        elif chunked:
            await self._counted(scope, receive, send, limit)
        else:
            await self.app(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app with a ``receive`` that raises ``BodyTooLarge`` past ``limit``.

        The app normally renders the exception itself; one that escapes (a
        reader outside FastAPI's handlers) is answered here if nothing was sent.
        """
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _refusal(exc)(scope, receive, send)


def _body_headers(scope: Scope) -> tuple[int | None, bool]:
    """The declared ``Content-Length`` (None if absent), and whether the body is chunked.

    The parser has already refused a malformed or doubled length (400), so an
    unreadable value here cannot occur; it is treated as absent all the same.
    """
    declared: int | None = None
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            declared = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return declared, chunked


def _refusal(exc: HTTPException) -> ASGIApp:
    return error_response(exc.status_code, exc.detail, exc.headers)
