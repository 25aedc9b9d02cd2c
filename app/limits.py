"""Limits enforced where the bytes arrive, before any route sees them.

The README's "Limits and abuse" says what a hostile or broken client gets.
Each limit is kept by the first layer that sees the bytes it bounds, so no
route has to remember it and none can forget it:

- **Request heads** (``LimitedProtocol``): only the server protocol sees a
  head before it is whole, so only it can bound one. A head must be complete
  within ``HEAD_TIMEOUT_SECONDS`` of the connection opening (or of the first
  byte of the next request on a kept-alive connection), and at most
  ``HEAD_BYTES`` long (431).
- **Bodies that do not come** (``LimitedProtocol``): a declared body must keep
  arriving (``SSEHUB_BODY_IDLE_SECONDS`` without a byte) and be complete
  ``SSEHUB_BODY_TOTAL_SECONDS`` after its head, or the request gets 408 and
  the connection is closed: the app waiting in ``receive`` cannot time the
  client, only the protocol sees the bytes come.
- **Responses nobody reads** (``LimitedProtocol``): a connection whose writes
  stay backed up for ``SSEHUB_SEND_TIMEOUT_SECONDS`` is dropped. Streams keep
  their own rule for that (``app.realtime.hub``); the protocol only frees their
  socket once they have ended.
- **Bodies** (``BodyLimit``): the first ASGI layer a request meets (after CORS,
  so a browser can read the 413). A declared ``Content-Length`` over the limit
  is refused before the app is called; a chunked body is counted as the app
  reads it and refused as soon as it crosses the limit.
- **Connections**: uvicorn's own ``limit_concurrency``
  (``uvicorn_limit_concurrency`` says why it is one more than the setting);
  ``LimitedProtocol`` only turns its plain-text 503 into our JSON error. One
  peer address may hold at most ``SSEHUB_MAX_CONNECTIONS_PER_CLIENT`` of them
  (``LimitedProtocol``, as the connection opens: 429), except a trusted proxy,
  whose connections carry many clients.
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
import contextlib
import http
import ipaddress
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.config import Settings
from app.errors import error_response
from app.realtime.direct_write import client_left
from app.route_table import KIB, Route

HEAD_BYTES = 16 * KIB  # request line and headers
HEAD_TIMEOUT_SECONDS = 10.0
SWEEP_SECONDS = 0.5  # so a head is refused between 10 and 10.5 s; likewise the other deadlines
CLOSE = {"Connection": "close"}
# Set to True in a request's scope by a response that times its own sends (a
# stream: ``app.realtime.hub``), so the protocol's send deadline leaves it alone
# while it runs.
SELF_TIMED = "ssehub.self_timed"


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
    (``app.realtime.direct_write`` needs uvicorn's own ``send``).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(
        self, app: ASGIApp, route: Route, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Run ``app`` on an HTTP request whose route (``app.route_table``) the
        caller has parsed: the table says how large its body may be."""
        limit = route.body_limit(self.settings)
        declared, chunked = _body_headers(scope)
        if declared is not None and declared > limit:
            await _refusal(BodyTooLarge(limit))(scope, receive, send)
        elif chunked:
            await _counted(app, scope, receive, send, limit)
        else:
            await app(scope, receive, send)


async def _counted(app: ASGIApp, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
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
        await app(scope, counted_receive, tracked_send)
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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The settings ``LimitedProtocol`` holds each connection to, read once
    (``app.realtime.server`` hands them to uvicorn with the protocol)."""

    body_idle_seconds: float
    body_total_seconds: float
    send_timeout_seconds: float
    per_client: int
    # SSEHUB_TRUSTED_PROXIES: peers whose connections are not counted per client.
    proxies: tuple[Network, ...] = ()
    proxy_names: frozenset[str] = frozenset()  # entries that are not addresses; "*": all

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        """Proxies read as uvicorn's ``ProxyHeadersMiddleware`` reads the same setting
        (its matcher is private): addresses and CIDRs, ``*`` for every peer, any
        other entry as a literal host."""
        networks, names = [], set()
        for entry in settings.trusted_proxy_list:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry)
        return cls(
            body_idle_seconds=settings.body_idle_seconds,
            body_total_seconds=settings.body_total_seconds,
            send_timeout_seconds=settings.send_timeout_seconds,
            per_client=settings.max_connections_per_client,
            proxies=tuple(networks),
            proxy_names=frozenset(names),
        )

    def counts(self, host: str) -> bool:
        """Whether a connection from ``host`` counts against ``per_client``.

        A trusted proxy's does not: each of its connections carries requests of
        many clients (which ones, only the requests say, and a proxy reuses a
        connection for several), so capping it would cap all of them together.
        Limiting each client behind a proxy is the proxy's to do."""
        if not self.proxies and not self.proxy_names:
            return True
        if "*" in self.proxy_names or host in self.proxy_names:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return not any(address in network for network in self.proxies)


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for heads, bodies and stuck
    writes, a size bound for heads, and a connection cap per client address.

    Why a subclass: a head and a body arrive inside the protocol before (or
    while) any ASGI code runs, and a write backs up in its transport, so no
    middleware can time them. The reach into uvicorn is kept to the parser
    callbacks and ``asyncio.Protocol`` events it overrides
    (``missing_uvicorn_hooks`` checks at start that uvicorn still has them),
    the response cycle's flags it reads, and two uvicorn methods:

    - ``send_400_response`` is what uvicorn calls when a parser callback
      raises; ours answers 431 when it was the head bound that raised.
    - ``_start_asgi_task`` starts a request's app; when uvicorn chose its
      plain-text 503 (too many connections) we start the JSON one instead. In
      a uvicorn without it, the 503 is uvicorn's plain text, still a 503.

    **Deadlines, not timers.** Each connection keeps the times by which its
    head or body must be complete and since when its writes are backed up; one
    sweep for all connections (``_sweep``) enforces them, which costs less
    than a timer made and cancelled per request (such timers cost a tenth of
    opening a stream in a reconnect storm).

    - The head deadline is armed when the connection opens and when a request
      begins with no deadline running, and disarmed when the head is complete:
      so it covers the first request from the connection's first moment, and
      every later one from its first byte (until then uvicorn's keep-alive
      timer closes an idle connection).
    - The body deadlines run from the complete head to the complete body (a
      request without a body completes with its head): no byte for
      ``body_idle_seconds``, or not complete ``body_total_seconds`` after the
      head, and the request gets 408 (or, if its answer has begun, the
      connection is closed). The idle clock stops while the server is the one
      holding the body back (reading paused because the app has not taken
      what came, or ``Expect: 100-continue`` not yet answered): a client is
      never timed for the server's wait.
    - The send deadline: writes backed up (the transport paused) for
      ``send_timeout_seconds`` drop the connection, with a reset (``_drop``):
      closing would wait for the very flush that is not happening. A stream
      (``SELF_TIMED``) keeps its own rule while it runs (the hub lets a reader
      go when one write has waited that long, and counts it), and is dropped
      here once it has ended.

    So a response that lasts hours (a stream) runs with no deadline of ours at
    all while its reader reads.

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
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.pipeline = _Pipeline()  # type: ignore[assignment]
        # One attribute, not several: past 30 attributes CPython stops sharing the
        # keys of instance dicts, and each connection's dict grew from 288 bytes
        # to 1,584.
        self._conn = _Connection(limits)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._count_client():
            # At once, before a head: a refused connection holds nothing, not even
            # for the head deadline.
            self._refuse(429, "Too many connections from this address", {"Retry-After": "1"})
            return
        _lighten(getattr(self.flow, "_is_writable_event", None))
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self._uncount_client()
        super().connection_lost(exc)
        # An open stream learns at once that its client left, with no task of its
        # own waiting for it (``app.realtime.stream``).
        client_left(self.cycle)

    def _enforce_deadlines(self, now: float) -> None:
        """Act on every deadline of this connection that has passed (``_sweep``)."""
        conn = self._conn
        limits = conn.limits
        if conn.deadline and conn.deadline <= now:
            self._head_timed_out()
        elif conn.body_by:
            if self._holds_body_back():
                conn.body_idle_by = now + limits.body_idle_seconds
            if min(conn.body_by, conn.body_idle_by) <= now:
                self._body_timed_out()
        if self._write_stuck(now) and (self.transport.is_closing() or not self._self_timed()):
            self._drop()

    # The connection cap per client address.

    def _count_client(self) -> bool:
        """Count this connection against its peer address; False if it is one too many."""
        conn = self._conn
        host = self.client[0] if self.client else None
        if host is None or not conn.limits.counts(host):
            return True
        clients = _clients(self.server_state)
        clients[host] = held = clients.get(host, 0) + 1
        conn.counted = True
        return held <= conn.limits.per_client

    def _uncount_client(self) -> None:
        if not self._conn.counted or not self.client:
            return
        self._conn.counted = False
        clients, host = _clients(self.server_state), self.client[0]
        held = clients.get(host, 1) - 1
        if held > 0:
            clients[host] = held
        else:
            clients.pop(host, None)

    # The head deadline.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._conn.parsed = self._conn.reads = 0
        self._conn.began_in_read = True
        if not self._conn.deadline:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._arm_body_timer()
        super().on_headers_complete()
        _lighten(getattr(self.cycle, "message_event", None))

    def _arm_head_timer(self) -> None:
        self._conn.deadline = self.loop.time() + HEAD_TIMEOUT_SECONDS
        if getattr(self.server_state, "ssehub_sweep", None) is None:
            self.server_state.ssehub_sweep = self.loop.call_later(  # type: ignore[attr-defined]
                SWEEP_SECONDS, _sweep, self.loop, self.server_state
            )

    def _disarm_head_timer(self) -> None:
        self._conn.deadline = 0.0

    def _head_timed_out(self) -> None:
        """No complete head in time: close, as uvicorn's keep-alive timer does
        (an answer would only keep the descriptor longer for a client that
        is not reading)."""
        self._conn.deadline = 0.0
        if not self.transport.is_closing():
            self.transport.close()

    # The body deadlines.

    def _arm_body_timer(self) -> None:
        conn = self._conn
        now = self.loop.time()
        conn.body_by = now + conn.limits.body_total_seconds
        conn.body_idle_by = now + conn.limits.body_idle_seconds

    def on_message_complete(self) -> None:
        self._conn.body_by = 0.0
        super().on_message_complete()

    def _holds_body_back(self) -> bool:
        """Whether the server, not the client, is why no body bytes come."""
        cycle = self.cycle
        return self.flow.read_paused or bool(cycle and cycle.waiting_for_100_continue)

    def _body_timed_out(self) -> None:
        """The body stopped coming: 408, or a close if an answer has begun."""
        self._conn.body_by = 0.0
        cycle = self.cycle
        if self.transport.is_closing():
            return
        if cycle is None or cycle.response_started:
            self.transport.close()
            return
        # The app, waiting in ``receive``, hears that the client is gone, and what
        # it sends from now on goes nowhere: this is the answer.
        cycle.disconnected = True
        cycle.message_event.set()
        self._refuse(408, "Request body not received in time")

    # The send deadline.

    def pause_writing(self) -> None:
        self._conn.write_paused_at = self.loop.time()
        super().pause_writing()

    def resume_writing(self) -> None:
        self._conn.write_paused_at = 0.0
        super().resume_writing()

    def _write_stuck(self, now: float) -> bool:
        """Whether writes have stayed backed up for the send timeout."""
        paused_at = self._conn.write_paused_at
        return bool(paused_at) and now - paused_at >= self._conn.limits.send_timeout_seconds

    def _drop(self) -> None:
        """Reset the connection, sending nothing more. A close (or an abort alone)
        would leave the kernel an orphaned socket that goes on offering up to its
        send buffer (megabytes) to a reader that takes none, for minutes."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _self_timed(self) -> bool:
        """Whether the response running now times its own sends (``SELF_TIMED``)."""
        cycle = self.cycle
        return bool(cycle and not cycle.response_complete and cycle.scope.get(SELF_TIMED))

    # The head size.

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 3)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._conn.parsed += size
        if self._conn.parsed > HEAD_BYTES:
            self._conn.too_large = True
            raise HeadTooLarge  # uvicorn catches it and calls send_400_response

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        conn.began_in_read = False
        super().data_received(data)
        if conn.body_by:  # a byte of the body (or of the head before it) came
            conn.body_idle_by = self.loop.time() + conn.limits.body_idle_seconds
        in_head = conn.deadline != 0.0 and not self.transport.is_closing()
        if not in_head or conn.began_in_read:
            return
        conn.reads += len(data)  # the whole read went into the unfinished head
        if conn.reads > HEAD_BYTES:
            self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        if self._conn.too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self._disarm_head_timer()
        self._refuse(431, "Request header fields too large")

    def _refuse(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        """Answer with our JSON error and close, outside any response cycle."""
        body = orjson.dumps({"detail": detail})
        head = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [f"{name}: {value}\r\n".encode() for name, value in (headers or {}).items()]
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


class _Connection:
    """Where one connection stands against its limits (``LimitedProtocol``)."""

    __slots__ = (
        "began_in_read",
        "body_by",
        "body_idle_by",
        "counted",
        "deadline",
        "limits",
        "parsed",
        "reads",
        "too_large",
        "write_paused_at",
    )

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.deadline = 0.0  # loop time by which the head must be complete; 0: none
        self.parsed = 0  # URL and header bytes handed over by the parser
        self.reads = 0  # bytes of whole reads spent inside this head
        self.began_in_read = False
        self.too_large = False
        self.body_by = 0.0  # loop time by which the body must be complete; 0: none pending
        self.body_idle_by = 0.0  # loop time by which the body's next byte must come
        self.write_paused_at = 0.0  # loop time since which writes are backed up; 0: they are not
        self.counted = False  # counted against its client address's cap


def _clients(server_state: ServerState) -> dict[str, int]:
    """Open connections per counted client address, for the whole server."""
    clients: dict[str, int] | None = getattr(server_state, "ssehub_clients", None)
    if clients is None:
        clients = server_state.ssehub_clients = {}  # type: ignore[attr-defined]
    return clients


def _sweep(loop: asyncio.AbstractEventLoop, server_state: ServerState) -> None:
    """Enforce every connection's deadlines; again in ``SWEEP_SECONDS`` while there
    are connections (the next connection starts it again). Scheduled before the
    work, so that no failure on one connection stops the deadlines of all."""
    server_state.ssehub_sweep = (  # type: ignore[attr-defined]
        loop.call_later(SWEEP_SECONDS, _sweep, loop, server_state)
        if server_state.connections
        else None
    )
    now = loop.time()
    for protocol in list(server_state.connections):
        if isinstance(protocol, LimitedProtocol):
            conn = protocol._conn
            # Most connections are open streams with no deadline running: skip
            # them without a call.
            if conn.deadline or conn.body_by or conn.write_paused_at:
                protocol._enforce_deadlines(now)


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
    "on_message_complete",
    "pause_writing",
    "resume_writing",
)


def missing_uvicorn_hooks() -> list[str]:
    """The methods ``LimitedProtocol`` overrides that this uvicorn lacks: an
    override of a method uvicorn no longer calls would silently stop a limit.

    ``_start_asgi_task`` is not among them: without it only the 503's body changes.
    """
    return [name for name in UVICORN_HOOKS if not callable(getattr(HttpToolsProtocol, name, None))]
