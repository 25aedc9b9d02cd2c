"""Limits enforced where the bytes arrive, before any route sees them.

The contract's "Limits" section says what a hostile or broken client gets.
Each limit is kept by the first layer that sees the bytes it bounds, so no
route has to remember it and none can forget it:

- **Request heads** (``HeadLimitedProtocol``): only the server protocol sees a
  head before it is whole, so only it can bound one. A head must be complete
  within ``HEAD_TIMEOUT_SECONDS`` of the connection opening (or of the first
  byte of the next request on a kept-alive connection), and at most
  ``HEAD_BYTES`` long (431).
- **Bodies** (``BodyLimit``): the first ASGI layer a request meets (after CORS,
  so a browser can read the 413). A declared ``Content-Length`` over the limit
  is refused before the app is called; a chunked body is counted as the app
  reads it and refused as soon as it crosses the limit.
- **Connections**: uvicorn's own ``limit_concurrency``
  (``uvicorn_limit_concurrency`` says why it is one more than the setting);
  ``HeadLimitedProtocol`` only turns its plain-text 503 into our JSON error.
- **The client address** is the peer's; ``app.main`` adds uvicorn's
  ``ProxyHeadersMiddleware`` for ``SSEHUB_TRUSTED_PROXIES`` only, and
  ``app.realtime.server`` turns off uvicorn's default trust of 127.0.0.1.

Why not Starlette's ``RequestBodyLimitMiddleware`` or FastAPI's
``max_body_size``: both call the app before refusing a declared oversize body,
answer in plain text, keep the connection open (so uvicorn reads a 2 GB body
to throw it away), and FastAPI's is per route, while the hot paths
(``app.hotpaths``) never reach FastAPI's routing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.config import Settings
from app.errors import error_response

KIB = 1024
HEAD_BYTES = 16 * KIB  # request line and headers
HEAD_TIMEOUT_SECONDS = 10.0
HEAD_SWEEP_SECONDS = 0.5  # so a head is refused between 10 and 10.5 s
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


def uvicorn_limit_concurrency(max_connections: int) -> int:
    """uvicorn's ``limit_concurrency`` that serves ``max_connections`` connections.

    uvicorn answers 503 when its open connections, counting the one asking,
    reach ``limit_concurrency``: with the setting itself, the last allowed
    connection would be refused.
    """
    return max_connections + 1


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head past ``HEAD_BYTES``."""


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound for request heads.

    Why a subclass: a head is buffered inside the protocol before any ASGI code
    runs, so no middleware can time it or bound it. The reach into uvicorn is
    kept to the parser callbacks and ``asyncio.Protocol`` events it overrides
    (``missing_uvicorn_hooks`` checks at start that uvicorn still has them)
    and two uvicorn methods:

    - ``send_400_response`` is what uvicorn calls when a parser callback
      raises; ours answers 431 when it was the head bound that raised.
    - ``_start_asgi_task`` starts a request's app; when uvicorn chose its
      plain-text 503 (too many connections) we start the JSON one instead. In
      a uvicorn without it, the 503 is uvicorn's plain text, still a 503.

    The head deadline is armed when the connection opens and when a request
    begins with no deadline running, and disarmed when the head is complete:
    so it covers the first request from the connection's first moment, and
    every later one from its first byte (until then uvicorn's keep-alive
    timer closes an idle connection), while a response (a stream that lasts
    hours) runs with no timer at all.

    It also keeps each connection lighter (``_lighten``): an open stream holds
    its connection for hours, ten thousand at a time.

    The head is measured two ways, and 431 is answered when either passes
    ``HEAD_BYTES``. Each is a lower bound of the head's true size, so a head
    within the limit is never refused:

    - the URL and every header (name, value and the ':' and CRLF around them)
      as the parser hands them over: exact, but httptools hands a header over
      only when it is complete, so one endless header would never show up;
    - every whole read received while the head stays incomplete, except the
      read in which it began (that one may end the previous request's body).
      This bounds the endless header: at most ``HEAD_BYTES`` plus one read is
      ever buffered.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.pipeline = _Pipeline()  # type: ignore[assignment]
        # One attribute, not five: past 30 attributes CPython stops sharing the
        # keys of instance dicts, and each connection's dict grew from 288 bytes
        # to 1,584.
        self._head = _Head()

    # The head deadline.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _lighten(getattr(self.flow, "_is_writable_event", None))
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)
        # An open stream learns at once that its client left, with no task of its
        # own waiting for it (``app.realtime.stream``).
        on_disconnect = getattr(self.cycle, "on_disconnect", None)
        if on_disconnect is not None:
            on_disconnect()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head.parsed = self._head.reads = 0
        self._head.began_in_read = True
        if not self._head.deadline:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()
        _lighten(getattr(self.cycle, "message_event", None))

    def _arm_head_timer(self) -> None:
        """A deadline, not a timer: one sweep for all connections (``_sweep_heads``)
        costs less than a timer made and cancelled per request (measured: a
        tenth of opening a stream in a reconnect storm)."""
        self._head.deadline = self.loop.time() + HEAD_TIMEOUT_SECONDS
        if getattr(self.server_state, "ssehub_head_sweep", None) is None:
            self.server_state.ssehub_head_sweep = self.loop.call_later(  # type: ignore[attr-defined]
                HEAD_SWEEP_SECONDS, _sweep_heads, self.loop, self.server_state
            )

    def _disarm_head_timer(self) -> None:
        self._head.deadline = 0.0

    def _head_timed_out(self) -> None:
        """No complete head in time: close, as uvicorn's keep-alive timer does
        (an answer would only keep the descriptor longer for a client that
        is not reading)."""
        self._head.deadline = 0.0
        if not self.transport.is_closing():
            self.transport.close()

    # The head size.

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 3)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head.parsed += size
        if self._head.parsed > HEAD_BYTES:
            self._head.too_large = True
            raise HeadTooLarge  # uvicorn catches it and calls send_400_response

    def data_received(self, data: bytes) -> None:
        self._head.began_in_read = False
        super().data_received(data)
        in_head = self._head.deadline != 0.0 and not self.transport.is_closing()
        if not in_head or self._head.began_in_read:
            return
        self._head.reads += len(data)  # the whole read went into the unfinished head
        if self._head.reads > HEAD_BYTES:
            self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        if self._head.too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self._disarm_head_timer()
        body = b'{"detail":"Request header fields too large"}'
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    # The connection cap: uvicorn decides, we only answer in JSON.

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if app is service_unavailable:
            app = too_many_connections
        super()._start_asgi_task(cycle, app)


class _Head:
    """Where the head being received stands (``HeadLimitedProtocol``)."""

    __slots__ = ("began_in_read", "deadline", "parsed", "reads", "too_large")

    def __init__(self) -> None:
        self.deadline = 0.0  # loop time by which the head must be complete; 0: none
        self.parsed = 0  # URL and header bytes handed over by the parser
        self.reads = 0  # bytes of whole reads spent inside this head
        self.began_in_read = False
        self.too_large = False


def _sweep_heads(loop: asyncio.AbstractEventLoop, server_state: ServerState) -> None:
    """Close every connection whose head is overdue; again in ``HEAD_SWEEP_SECONDS``
    while there are connections (the next connection starts it again)."""
    now = loop.time()
    for protocol in list(server_state.connections):
        if isinstance(protocol, HeadLimitedProtocol):
            deadline = protocol._head.deadline
            if deadline and deadline <= now:
                protocol._head_timed_out()
    server_state.ssehub_head_sweep = (  # type: ignore[attr-defined]
        loop.call_later(HEAD_SWEEP_SECONDS, _sweep_heads, loop, server_state)
        if server_state.connections
        else None
    )


class _Pipeline(list[Any]):
    """uvicorn's queue of pipelined requests, as a list: an empty ``deque`` takes
    624 bytes, an empty list 56, and all but a few connections never pipeline."""

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def _lighten(event: asyncio.Event | None) -> None:
    """Give an ``asyncio.Event`` a list of waiters instead of its ``deque``: it only
    appends, removes and iterates them, and each connection keeps two such
    events for its whole life (624 bytes each, empty). Left alone where it is
    not the empty ``deque`` expected."""
    waiters = getattr(event, "_waiters", None)
    if isinstance(waiters, deque) and not waiters:
        event._waiters = []  # type: ignore[union-attr]


async def too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    """uvicorn's 503 for a connection past ``limit_concurrency``, as our JSON error.
    ``Connection: close`` frees the connection the refused client holds."""
    headers = {**CLOSE, "Retry-After": "1"}
    await error_response(503, "Too many connections", headers)(scope, receive, send)


UVICORN_HOOKS = (
    "send_400_response",
    "data_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
)


def missing_uvicorn_hooks() -> list[str]:
    """The methods ``HeadLimitedProtocol`` overrides that this uvicorn lacks: an
    override of a method uvicorn no longer calls would silently stop a limit.

    ``_start_asgi_task`` is not among them: without it only the 503's body changes.
    """
    return [name for name in UVICORN_HOOKS if not callable(getattr(HttpToolsProtocol, name, None))]
