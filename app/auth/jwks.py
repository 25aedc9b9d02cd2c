"""The identity provider's key set (JWKS): fetched one at a time, kept while it fails.

PyJWT's ``PyJWKClient`` fetches and parses the set (http(s) only, no
redirects, only signing keys with a ``kid``); ``KeySet`` decides when to ask
and who waits, because the client alone serialises every caller behind one
lock, fetches again for each of them when the provider fails, and drops to
503 for everyone once its cache ages out and the provider is down. What
``KeySet`` keeps, and where:

- **One fetch at a time** (``_fetching``): every request that needs the set
  awaits the same fetch; none starts another while it runs.
- **A failure is remembered for** ``FAILURE_SECONDS`` (``_failed``): until
  then, a request that needs a fetch gets 503 at once, without one.
- **The last good set keeps verifying** (``key``): a ``kid`` it holds is
  answered from it at once, also while a refetch runs or after it failed; a
  set older than ``MAX_AGE_SECONDS`` is refreshed in the background, and
  replaced only by a set that was fetched and parsed whole.
- **No request waits more than** ``WAIT_SECONDS`` (``_fetched``): it stops
  waiting (503), the fetch goes on for the next request. The fetch runs in a
  daemon thread of its own: a provider that never finishes answering holds no
  executor worker, nor the process's exit.
- An unknown ``kid`` refetches at most once per ``REFETCH_SECONDS`` after a
  good fetch (a rotated key), and is a 401 in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import jwt

from app.errors import Unauthorized, Unavailable

log = logging.getLogger("ssehub")

HTTP_TIMEOUT_SECONDS = 5.0  # each socket operation of a fetch (urllib's timeout)
WAIT_SECONDS = 6.0
FAILURE_SECONDS = 5.0
REFETCH_SECONDS = 30.0
MAX_AGE_SECONDS = 300.0
UNAVAILABLE = "The identity provider's keys cannot be fetched"
T = TypeVar("T")


class KeySet:
    """The signing keys at ``url`` by ``kid``, as the module docstring says."""

    def __init__(self, url: str) -> None:
        # The client's own set cache is off: ``KeySet`` keeps the set, so that
        # a failed refetch never takes the last good one away.
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=HTTP_TIMEOUT_SECONDS)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # monotonic; the last good fetch
        self._failed_at: float | None = None  # monotonic; the last fetch, if it failed
        self._fetching: asyncio.Future[None] | None = None

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key ``kid``: 401 if the provider has no such key, 503 if its keys
        cannot be fetched now."""
        known = self._keys.get(kid)
        if known is not None:
            if self._age() >= MAX_AGE_SECONDS and self._failure_left() == 0:
                self._fetch()  # in the background: the set in hand keeps verifying
            return known
        if self._age() < REFETCH_SECONDS:
            raise Unauthorized("Invalid or expired token")
        await self._fetched()
        known = self._keys.get(kid)
        if known is None:
            raise Unauthorized("Invalid or expired token")
        return known

    def _age(self) -> float:
        """Seconds since the last good fetch; infinite before the first."""
        if self._fetched_at is None:
            return math.inf
        return time.monotonic() - self._fetched_at

    def _failure_left(self) -> float:
        """Seconds for which the last failed fetch is still remembered (0: none)."""
        if self._failed_at is None:
            return 0.0
        return max(0.0, self._failed_at + FAILURE_SECONDS - time.monotonic())

    async def _fetched(self) -> None:
        """Wait (at most ``WAIT_SECONDS``) for the one fetch; 503 if it failed,
        failed less than ``FAILURE_SECONDS`` ago, or is still running."""
        left = self._failure_left()
        if left == 0:
            fetching = self._fetch()
            try:
                # shield: a waiter that gives up leaves the fetch to the others.
                await asyncio.wait_for(asyncio.shield(fetching), WAIT_SECONDS)
            except TimeoutError:
                raise Unavailable(UNAVAILABLE) from None
            left = self._failure_left()
        if left > 0:
            raise Unavailable(UNAVAILABLE, headers={"Retry-After": str(math.ceil(left))})

    def _fetch(self) -> asyncio.Future[None]:
        """The fetch under way, or a new one."""
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch_once())
        return self._fetching

    async def _fetch_once(self) -> None:
        """Fetch the set and keep it, or note the failure; never raises, so no
        waiter (nor the absence of one) sees an exception of the fetch."""
        try:
            keys = await _in_daemon_thread(lambda: self._client.get_signing_keys(refresh=True))
        except Exception as exc:  # unreachable, an error page, not a key set, no usable key
            self._failed_at = time.monotonic()
            log.warning("jwks: fetching %s failed (%s)", self._client.uri, exc)
        else:
            fresh: dict[str, jwt.PyJWK] = {}
            for key in keys:  # the first of a repeated kid, as PyJWKClient.match_kid
                fresh.setdefault(str(key.key_id), key)
            self._keys, self._fetched_at, self._failed_at = fresh, time.monotonic(), None
        finally:
            self._fetching = None


def _in_daemon_thread(work: Callable[[], T]) -> asyncio.Future[T]:
    """``work()`` in a daemon thread of its own, its outcome in a future of the
    running loop (dropped if the loop has closed meanwhile)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:  # handed to the loop, raised there
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="jwks-fetch", daemon=True).start()
    return future
