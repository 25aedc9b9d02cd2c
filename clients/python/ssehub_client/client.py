"""``Client`` (sync) and ``AsyncClient``: publishing and streaming, on httpx and httpx-sse.

**A retried publish never publishes twice.** ``publish`` sends an
``Idempotency-Key`` (a new random one unless you give your own) and retries
with the same key on a 503 or a lost connection, the cases in which the
server may or may not have stored the event: the server answers a repeated key
with the first event (200), within 24 hours. A batch carries no key, so it is
retried only when the connection failed before anything was sent.

**A stream resumes exactly.** ``stream`` yields ``Event``s and ``Notice``s;
when the connection drops it reconnects with backoff and ``Last-Event-ID``,
so the events go on with no gap and no duplicate (the server guarantees
"everything after the last id I saw"). After ``ssehub.reset`` (a position
above every id the server has issued, as after a restore) the position is
the notice's ``last_event_id``, so the newer events, with lower ids, come. A
refused stream (401, 403, 404) raises ``SsehubError`` instead of retrying
forever. One case it cannot cover: a stream opened without ``last_event_id``
that drops before its first event has no position yet, and goes on live from
its reconnection; pass a position (``0``: all retained history) where that
matters.

**Names are names.** Every channel name and username is quoted as one path
segment: ``publish("../users/bob", ...)`` asks for a channel of that (bad)
name, never for another path.

Credentials: an API key (``ssehub_...``: publishing and history) or a token
(an access token, for everything a user may do, streams included). ``token``
may be a callable returning one (sync, or async for ``AsyncClient``), called
on every connection, so a long-lived stream can renew it.

**One core, two shells.** Every request is built, every answer read and
every retry decided by code that does no I/O (``_Call``, ``_Retry``,
``_Stream``); ``Client`` and ``AsyncClient`` only send, read and sleep, so the
two cannot drift apart in what they do.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

DEFAULT_RETRIES = 5
BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
RETRY_STATUSES = frozenset({502, 503, 504})
_NOT_USERNAME = re.compile(r"[^A-Za-z0-9_.\-]")
H = TypeVar("H", httpx.Client, httpx.AsyncClient)
Token = str | Callable[[], str] | Callable[[], Awaitable[str]] | None


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    channel: str
    type: str
    data: Any
    published_at: str


@dataclass(frozen=True, slots=True)
class Notice:
    """A server notice: ``ssehub.live``, ``ssehub.truncated``, ``ssehub.expired``,
    ``ssehub.channel_removed`` or ``ssehub.reset``. Only ``ssehub.reset`` moves
    the position (``_Stream``)."""

    type: str
    data: dict[str, Any]


class SsehubError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def username_for(subject: str) -> str:
    """The ssehub username of your identity provider's user ``subject`` (its
    ``sub``): the characters a username cannot hold become ``_`` (the first 55
    kept), and ``-`` plus 8 hex digits of its SHA-256 follow, so ``alice`` is
    ``alice-`` + 8 hex digits; registration refuses names of that form. What
    ``POST /users/{username}/events`` needs to push to that user."""
    digest = hashlib.sha256(subject.encode()).hexdigest()[:8]
    return f"{_NOT_USERNAME.sub('_', subject)[:55]}-{digest}"


def api_path(*segments: str) -> str:
    """A path of the API from its segments, each quoted whole: a ``/``, ``?`` or
    ``#`` in a name stays in the name, and a name that is only dots (which URL
    handling would resolve as ``.`` or ``..``) is sent with its dots escaped."""
    return "".join("/" + _segment(segment) for segment in segments)


def _segment(name: str) -> str:
    quoted = quote(name, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def stream_path(channels: str | Sequence[str] | None) -> str:
    """``None`` or ``"/stream"``: the caller's subscriptions; a channel name: that channel."""
    if channels is None or channels == "/stream":
        return "/stream"
    if isinstance(channels, str):
        return api_path("channels", channels, "stream")
    if len(channels) == 1:
        return api_path("channels", channels[0], "stream")
    raise ValueError("one channel per stream here; AsyncClient.stream merges several")


def _backoff(attempt: int, retry_after: str | None = None) -> float:
    if retry_after and retry_after.isdigit():
        return min(float(retry_after), 30.0)
    base = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)]
    return base * (0.5 + random.random())  # jitter, not secrecy


# The core: requests, answers, retries and stream positions, without I/O.


def _checked(response: httpx.Response) -> Any:
    """The answer's JSON, or ``SsehubError`` with the server's ``detail``."""
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = response.text
        raise SsehubError(response.status_code, detail)
    return response.json() if response.content else None


def _item(sse: ServerSentEvent) -> Event | Notice | None:
    """An SSE frame as an ``Event`` or a ``Notice`` (comments and the retry line: None)."""
    if not sse.data:
        return None
    payload = json.loads(sse.data)
    if sse.event.startswith("ssehub."):
        return Notice(sse.event, payload)
    return Event(
        payload["id"], payload["channel"], payload["type"], payload["data"], payload["published_at"]
    )


def _bearer(token: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True, slots=True)
class _Call:
    """One API request as the shells send it, and how its answer is read.

    Built once, so every retry repeats it byte for byte: in particular the same
    ``Idempotency-Key``. ``safe``: it may be sent again after it may have
    reached the server. ``retries``: None for the client's own count."""

    method: str
    path: str
    json: Any = None
    params: dict[str, int] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    safe: bool = False
    retries: int | None = None
    unwrap: str | None = None  # the member of the answer that is the result

    def result(self, response: httpx.Response) -> Any:
        checked = _checked(response)
        return checked if self.unwrap is None else checked[self.unwrap]


def _publish(kind: str, name: str, data: Any, type: str, key: str | None) -> _Call:
    """One event to a channel (``kind`` "channels") or a user ("users"), with
    an Idempotency-Key (a new random one unless given) that makes it safe to
    repeat: the server answers a repeated key with the first event."""
    return _Call(
        "POST",
        api_path(kind, name, "events"),
        json={"type": type, "data": data},
        headers={"Idempotency-Key": key or uuid.uuid4().hex},
        safe=True,
    )


def _batch(channel: str, events: Sequence[dict[str, Any]]) -> _Call:
    """A batch carries no key: repeated only when nothing of it was sent."""
    path = api_path("channels", channel, "events", "batch")
    return _Call("POST", path, json={"events": list(events)}, unwrap="events")


def _history(channel: str, after: int, limit: int) -> _Call:
    """Asked once (``retries=0``): a reader that pages asks again anyway."""
    params = {"after": after, "limit": limit}
    return _Call("GET", api_path("channels", channel, "events"), params=params, retries=0)


def _presence(channel: str) -> _Call:
    """Reading only: safe to repeat."""
    return _Call("GET", api_path("channels", channel, "presence"), safe=True)


class _Retry:
    """The retry policy of one ``_Call``: after each attempt, wait or stop.

    A 502/503/504 or a lost connection leaves open whether the server acted,
    so only a ``safe`` call is repeated then; a connection that failed to open
    sent nothing, so any call is repeated after it."""

    __slots__ = ("_attempt", "_retries", "_safe")

    def __init__(self, call: _Call, retries: int) -> None:
        self._attempt, self._safe = 0, call.safe
        self._retries = retries if call.retries is None else call.retries

    def after(self, outcome: httpx.Response | httpx.TransportError) -> httpx.Response | float:
        """The answer to take, or the seconds to wait before the next attempt;
        re-raises a transport error that must not (or no longer) be retried."""
        attempt, self._attempt = self._attempt, self._attempt + 1
        last = attempt >= self._retries
        if isinstance(outcome, httpx.TransportError):
            if last or not (self._safe or isinstance(outcome, httpx.ConnectError)):
                raise outcome
            return _backoff(attempt)
        if outcome.status_code in RETRY_STATUSES and self._safe and not last:
            return _backoff(attempt, outcome.headers.get("retry-after"))
        return outcome


class _Stream:
    """Where one stream stands, what of it to yield, and when to reconnect.

    The position is the id of the last event yielded; an event at or below it
    was yielded already (a reconnection's replay) and is skipped. A
    ``ssehub.reset`` notice moves it to the notice's ``last_event_id``: the
    server went on from there, and a position left above it would skip every
    newer event as seen. The backoff restarts at each accepted connection, so
    a stream that ran for hours and drops reconnects within a second."""

    __slots__ = ("_attempt", "last_event_id", "path")

    def __init__(self, path: str, last_event_id: int | None) -> None:
        self.path, self.last_event_id, self._attempt = path, last_event_id, 0

    def headers(self, auth: dict[str, str]) -> dict[str, str]:
        """The credentials and ``Last-Event-ID`` for the next connection."""
        position = self.last_event_id
        return auth if position is None else {**auth, "Last-Event-ID": str(position)}

    def connected(self, response: httpx.Response) -> bool:
        """Whether this answer is the stream to read. Otherwise (its body read)
        a refusal retrying cannot change (401, 403, 404) raises ``SsehubError``,
        and False means: unavailable, wait and reconnect."""
        if response.status_code == 200:
            self._attempt = 0
            return True
        if response.status_code not in RETRY_STATUSES:
            _checked(response)
        return False

    def take(self, sse: ServerSentEvent) -> Event | Notice | None:
        """The item this frame yields, if any, with the position moved past it."""
        item = _item(sse)
        if isinstance(item, Event):
            if self.last_event_id is not None and item.id <= self.last_event_id:
                return None
            self.last_event_id = item.id
        elif isinstance(item, Notice) and item.type == "ssehub.reset":
            reset_to = item.data.get("last_event_id")
            if isinstance(reset_to, int):
                self.last_event_id = reset_to
        return item

    def pause(self) -> float:
        """Seconds to wait before reconnecting, longer after each failure."""
        self._attempt += 1
        return _backoff(self._attempt - 1)


class _Base(Generic[H]):
    """What both shells hold: the credentials, the retry count and the HTTP
    client (``httpx.Client`` or ``httpx.AsyncClient``, by ``_http_class``)."""

    _http_class: type[H]

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        token: Token = None,
        retries: int = DEFAULT_RETRIES,
        timeout: float = 30.0,
        http: H | None = None,
    ) -> None:
        if api_key and token:
            raise ValueError("give an API key or a token, not both")
        self._api_key = api_key
        self._token = token
        self.retries = retries
        self.http: H = http or self._http_class(base_url=url, timeout=timeout)

    def _credential(self) -> object:
        """The key or token, or what the token provider returns (maybe awaitable)."""
        given = self._api_key or self._token
        return given() if callable(given) else given


# The shells: each only sends, reads and sleeps.


class Client(_Base[httpx.Client]):
    """A synchronous client (``with Client(url, api_key=...) as hub: ...``)."""

    _http_class = httpx.Client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _auth(self) -> dict[str, str]:
        token = self._credential()
        if inspect.isawaitable(token):
            raise TypeError("Client takes a sync token provider; use AsyncClient for async")
        return _bearer(token)

    def publish(
        self, channel: str, data: Any, *, type: str = "message", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Publish one event; returns it (the first one, if the key was used before)."""
        call = _publish("channels", channel, data, type, idempotency_key)
        return self._send(call)  # type: ignore[no-any-return]

    def publish_to_user(
        self, username: str, data: Any, *, type: str = "message", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Push one event to a user's personal channel (``@USERNAME``)."""
        call = _publish("users", username, data, type, idempotency_key)
        return self._send(call)  # type: ignore[no-any-return]

    def publish_batch(self, channel: str, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Publish 1 to 1000 events (``{"type", "data"}``) at once, all or nothing."""
        return self._send(_batch(channel, events))  # type: ignore[no-any-return]

    def history(self, channel: str, after: int = 0, limit: int = 100) -> dict[str, Any]:
        """One page of a channel's history: ``{"events", "next_after"}``."""
        return self._send(_history(channel, after, limit))  # type: ignore[no-any-return]

    def presence(self, channel: str) -> dict[str, Any]:
        """Who is online in a presence channel: ``{"channel", "users"}``, each user
        ``{"username", "streams", "since"}``; 409 (``SsehubError``) if presence is off."""
        return self._send(_presence(channel))  # type: ignore[no-any-return]

    def _send(self, call: _Call) -> Any:
        retry = _Retry(call, self.retries)
        while True:
            headers = {**call.headers, **self._auth()}
            try:
                outcome: httpx.Response | httpx.TransportError = self.http.request(
                    call.method, call.path, json=call.json, params=call.params, headers=headers
                )
            except httpx.TransportError as exc:
                outcome = exc
            step = retry.after(outcome)
            if isinstance(step, httpx.Response):
                return call.result(step)
            time.sleep(step)

    def stream(
        self, channels: str | Sequence[str] | None = None, *, last_event_id: int | None = None
    ) -> Iterator[Event | Notice]:
        """Events (and notices) of a channel, or of the caller's subscriptions and
        personal channel (``None``), resuming after ``last_event_id``; reconnects
        by itself and goes on from the last event it yielded."""
        state = _Stream(stream_path(channels), last_event_id)
        while True:
            headers = state.headers(self._auth())
            try:
                with connect_sse(
                    self.http, "GET", state.path, headers=headers, timeout=None
                ) as source:
                    if source.response.status_code != 200:
                        source.response.read()
                    if state.connected(source.response):
                        for sse in source.iter_sse():
                            if (item := state.take(sse)) is not None:
                                yield item
            except httpx.TransportError:
                pass
            time.sleep(state.pause())


class AsyncClient(_Base[httpx.AsyncClient]):
    """An asyncio client (``async with AsyncClient(url, token=...) as hub: ...``)."""

    _http_class = httpx.AsyncClient

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _auth(self) -> dict[str, str]:
        token = self._credential()
        if inspect.isawaitable(token):
            token = await token
        return _bearer(token)

    async def publish(
        self, channel: str, data: Any, *, type: str = "message", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Publish one event; returns it (the first one, if the key was used before)."""
        call = _publish("channels", channel, data, type, idempotency_key)
        return await self._send(call)  # type: ignore[no-any-return]

    async def publish_to_user(
        self, username: str, data: Any, *, type: str = "message", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Push one event to a user's personal channel (``@USERNAME``)."""
        call = _publish("users", username, data, type, idempotency_key)
        return await self._send(call)  # type: ignore[no-any-return]

    async def publish_batch(
        self, channel: str, events: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Publish 1 to 1000 events (``{"type", "data"}``) at once, all or nothing."""
        return await self._send(_batch(channel, events))  # type: ignore[no-any-return]

    async def history(self, channel: str, after: int = 0, limit: int = 100) -> dict[str, Any]:
        """One page of a channel's history: ``{"events", "next_after"}``."""
        return await self._send(_history(channel, after, limit))  # type: ignore[no-any-return]

    async def presence(self, channel: str) -> dict[str, Any]:
        """Who is online in a presence channel (see ``Client.presence``)."""
        return await self._send(_presence(channel))  # type: ignore[no-any-return]

    async def _send(self, call: _Call) -> Any:
        retry = _Retry(call, self.retries)
        while True:
            headers = {**call.headers, **await self._auth()}
            try:
                outcome: httpx.Response | httpx.TransportError = await self.http.request(
                    call.method, call.path, json=call.json, params=call.params, headers=headers
                )
            except httpx.TransportError as exc:
                outcome = exc
            step = retry.after(outcome)
            if isinstance(step, httpx.Response):
                return call.result(step)
            await asyncio.sleep(step)

    async def stream(
        self, channels: str | Sequence[str] | None = None, *, last_event_id: int | None = None
    ) -> AsyncIterator[Event | Notice]:
        """Events (and notices) of a channel, of several (one stream each, merged as
        they arrive: in id order per channel), or of the caller's subscriptions
        and personal channel (``None``), resuming after ``last_event_id``;
        reconnects by itself and goes on from the last event it yielded."""
        if channels is None or isinstance(channels, str) or len(channels) == 1:
            async for item in self._stream(stream_path(channels), last_event_id):
                yield item
            return
        merged: asyncio.Queue[Event | Notice | BaseException] = asyncio.Queue(maxsize=1000)

        async def pump(channel: str) -> None:
            try:
                async for item in self._stream(stream_path(channel), last_event_id):
                    await merged.put(item)
            except BaseException as exc:
                await merged.put(exc)

        tasks = [asyncio.create_task(pump(channel)) for channel in channels]
        try:
            while True:
                got = await merged.get()
                if isinstance(got, BaseException):
                    raise got
                yield got
        finally:
            for task in tasks:
                task.cancel()

    async def _stream(self, path: str, last_event_id: int | None) -> AsyncIterator[Event | Notice]:
        state = _Stream(path, last_event_id)
        while True:
            headers = state.headers(await self._auth())
            try:
                async with aconnect_sse(
                    self.http, "GET", state.path, headers=headers, timeout=None
                ) as source:
                    if source.response.status_code != 200:
                        await source.response.aread()
                    if state.connected(source.response):
                        async for sse in source.aiter_sse():
                            if (item := state.take(sse)) is not None:
                                yield item
            except httpx.TransportError:
                pass
            await asyncio.sleep(state.pause())
