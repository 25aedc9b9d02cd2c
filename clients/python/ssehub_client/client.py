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
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

DEFAULT_RETRIES = 5
BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
RETRY_STATUSES = frozenset({502, 503, 504})
_NOT_USERNAME = re.compile(r"[^A-Za-z0-9_.\-]")
T = TypeVar("T")
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
    the position (``_Position``)."""

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


def _retry_after_error(exc: httpx.TransportError, attempt: int, retries: int, safe: bool) -> float:
    """How long to wait before retrying after a lost connection; re-raises when
    it must not be retried: no attempts left, or a request that is not safe to
    repeat (no idempotency key) and may have reached the server."""
    if attempt == retries or not (safe or isinstance(exc, httpx.ConnectError)):
        raise exc
    return _backoff(attempt)


def _retry_after_response(
    response: httpx.Response, attempt: int, retries: int, safe: bool
) -> float | None:
    """How long to wait before retrying this answer, or None to take it as it is."""
    if response.status_code in RETRY_STATUSES and safe and attempt < retries:
        return _backoff(attempt, response.headers.get("retry-after"))
    return None


def _checked(response: httpx.Response) -> Any:
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


def _publish_request(
    data: Any, type: str, key: str | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and headers of one publish (a new random key unless one is given)."""
    return {"type": type, "data": data}, {"Idempotency-Key": key or uuid.uuid4().hex}


class _Position:
    """Where a stream stands, and what of it to yield: both clients follow it.

    The position is the id of the last event yielded; an event at or below it
    was yielded already (a reconnection's replay) and is skipped. A
    ``ssehub.reset`` notice moves it to the notice's ``last_event_id``: the
    server went on from there, and a position left above it would skip every
    newer event as seen."""

    __slots__ = ("last_event_id",)

    def __init__(self, last_event_id: int | None) -> None:
        self.last_event_id = last_event_id

    def headers(self) -> dict[str, str]:
        """``Last-Event-ID`` for the next connection, if there is a position."""
        position = self.last_event_id
        return {} if position is None else {"Last-Event-ID": str(position)}

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


class _Base:
    def __init__(self, api_key: str | None, token: Token, retries: int) -> None:
        if api_key and token:
            raise ValueError("give an API key or a token, not both")
        self._api_key = api_key
        self._token = token
        self.retries = retries


class Client(_Base):
    """A synchronous client (``with Client(url, api_key=...) as hub: ...``)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        token: Token = None,
        retries: int = DEFAULT_RETRIES,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        super().__init__(api_key, token, retries)
        self.http = http or httpx.Client(base_url=url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _auth(self) -> dict[str, str]:
        given = self._api_key or self._token
        token = given() if callable(given) else given
        if inspect.isawaitable(token):
            raise TypeError("Client takes a sync token provider; use AsyncClient for async")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def publish(
        self, channel: str, data: Any, *, type: str = "message", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Publish one event; returns it (the first one, if the key was used before)."""
        body, headers = _publish_request(data, type, idempotency_key)
        path = api_path("channels", channel, "events")
        return self._retrying("POST", path, body, headers, safe=True)  # type: ignore[no-any-return]

    def publish_to_user(
        self, username: str, data: Any, *, type: str = "message", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Push one event to a user's personal channel (``@USERNAME``)."""
        body, headers = _publish_request(data, type, idempotency_key)
        path = api_path("users", username, "events")
        return self._retrying("POST", path, body, headers, safe=True)  # type: ignore[no-any-return]

    def publish_batch(self, channel: str, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Publish 1 to 1000 events (``{"type", "data"}``) at once, all or nothing."""
        body = {"events": list(events)}
        path = api_path("channels", channel, "events", "batch")
        result = self._retrying("POST", path, body, {}, safe=False)
        return result["events"]  # type: ignore[no-any-return]

    def history(self, channel: str, after: int = 0, limit: int = 100) -> dict[str, Any]:
        """One page of a channel's history: ``{"events", "next_after"}``."""
        params = {"after": after, "limit": limit}
        path = api_path("channels", channel, "events")
        response = self.http.get(path, params=params, headers=self._auth())
        return _checked(response)  # type: ignore[no-any-return]

    def _retrying(
        self, method: str, path: str, body: Any, headers: dict[str, str], *, safe: bool
    ) -> Any:
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(
                    method, path, json=body, headers={**headers, **self._auth()}
                )
            except httpx.TransportError as exc:
                time.sleep(_retry_after_error(exc, attempt, self.retries, safe))
                continue
            delay = _retry_after_response(response, attempt, self.retries, safe)
            if delay is None:
                return _checked(response)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def stream(
        self, channels: str | Sequence[str] | None = None, *, last_event_id: int | None = None
    ) -> Iterator[Event | Notice]:
        """Events (and notices) of a channel, or of the caller's subscriptions and
        personal channel (``None``), resuming after ``last_event_id``; reconnects
        by itself and goes on from the last event it yielded."""
        path, position, attempt = stream_path(channels), _Position(last_event_id), 0
        while True:
            headers = {**self._auth(), **position.headers()}
            try:
                with connect_sse(self.http, "GET", path, headers=headers, timeout=None) as source:
                    if source.response.status_code != 200:
                        source.response.read()
                        if source.response.status_code not in RETRY_STATUSES:
                            _checked(source.response)
                        raise httpx.TransportError("server unavailable")
                    attempt = 0
                    for sse in source.iter_sse():
                        item = position.take(sse)
                        if item is not None:
                            yield item
            except httpx.TransportError:
                pass
            time.sleep(_backoff(attempt))
            attempt += 1


class AsyncClient(_Base):
    """An asyncio client (``async with AsyncClient(url, token=...) as hub: ...``)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        token: Token = None,
        retries: int = DEFAULT_RETRIES,
        timeout: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(api_key, token, retries)
        self.http = http or httpx.AsyncClient(base_url=url, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _auth(self) -> dict[str, str]:
        given = self._api_key or self._token
        token = given() if callable(given) else given
        if inspect.isawaitable(token):
            token = await token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def publish(
        self, channel: str, data: Any, *, type: str = "message", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Publish one event; returns it (the first one, if the key was used before)."""
        body, headers = _publish_request(data, type, idempotency_key)
        path = api_path("channels", channel, "events")
        return await self._retrying("POST", path, body, headers, safe=True)  # type: ignore[no-any-return]

    async def publish_to_user(
        self, username: str, data: Any, *, type: str = "message", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Push one event to a user's personal channel (``@USERNAME``)."""
        body, headers = _publish_request(data, type, idempotency_key)
        path = api_path("users", username, "events")
        return await self._retrying("POST", path, body, headers, safe=True)  # type: ignore[no-any-return]

    async def publish_batch(
        self, channel: str, events: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Publish 1 to 1000 events (``{"type", "data"}``) at once, all or nothing."""
        body = {"events": list(events)}
        path = api_path("channels", channel, "events", "batch")
        result = await self._retrying("POST", path, body, {}, safe=False)
        return result["events"]  # type: ignore[no-any-return]

    async def history(self, channel: str, after: int = 0, limit: int = 100) -> dict[str, Any]:
        """One page of a channel's history: ``{"events", "next_after"}``."""
        params = {"after": after, "limit": limit}
        headers = await self._auth()
        path = api_path("channels", channel, "events")
        response = await self.http.get(path, params=params, headers=headers)
        return _checked(response)  # type: ignore[no-any-return]

    async def _retrying(
        self, method: str, path: str, body: Any, headers: dict[str, str], *, safe: bool
    ) -> Any:
        for attempt in range(self.retries + 1):
            try:
                response = await self.http.request(
                    method, path, json=body, headers={**headers, **await self._auth()}
                )
            except httpx.TransportError as exc:
                await asyncio.sleep(_retry_after_error(exc, attempt, self.retries, safe))
                continue
            delay = _retry_after_response(response, attempt, self.retries, safe)
            if delay is None:
                return _checked(response)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

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
        position, attempt = _Position(last_event_id), 0
        while True:
            headers = {**await self._auth(), **position.headers()}
            try:
                async with aconnect_sse(
                    self.http, "GET", path, headers=headers, timeout=None
                ) as source:
                    if source.response.status_code != 200:
                        await source.response.aread()
                        if source.response.status_code not in RETRY_STATUSES:
                            _checked(source.response)
                        raise httpx.TransportError("server unavailable")
                    attempt = 0
                    async for sse in source.aiter_sse():
                        item = position.take(sse)
                        if item is not None:
                            yield item
            except httpx.TransportError:
                pass
            await asyncio.sleep(_backoff(attempt))
            attempt += 1
