"""Login and registration floods: bounded password hashing, rate-limited failures.

An argon2 hash here costs about 0.2 s of CPU (spread over two threads) and
64 MiB of memory, and anyone can ask for one by sending a wrong password. So:

- Hashing runs in a small thread pool of its own (``HASH_WORKERS``), never in
  the default executor, with at most ``HASH_WAITING`` more requests waiting;
  past that the answer is 429 at once. A login takes its place (``slot``)
  before it looks the user up, so a flood also costs the database no more
  than ``HASH_WORKERS + HASH_WAITING`` queries at a time. Its threads run at a lower priority
  (nice ``HASH_NICENESS``, inherited by argon2's own lane threads), so the
  event loop, which serves every other request and every stream, always gets
  the CPU first: ``/readyz`` and the API keep answering during a flood.
- No database connection is held while hashing (``app.auth.service``).
- Failed attempts are counted per username and per client address, in a
  moving window of a minute (the ``limits`` library); past
  ``SSEHUB_LOGIN_ATTEMPTS_PER_MINUTE`` for either, the answer is 429 with
  ``Retry-After`` before any hashing. Counts are per process: with k
  instances an attacker gets k times the attempts, still a bounded number.

The client address is the peer's, or what a trusted proxy put in
``X-Forwarded-For`` (``SSEHUB_TRUSTED_PROXIES``, applied by uvicorn's proxy
headers middleware before any of this runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.requests import Request

from app.errors import TooManyRequests

HASH_WORKERS = 2
HASH_WAITING = 8
HASH_NICENESS = 10
T = TypeVar("T")


def _lower_priority() -> None:
    """Run this hashing thread (and the threads argon2 starts from it) behind the
    event loop: on Linux a thread's niceness is its own and is inherited."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_NICENESS)


def client_address(request: Request) -> str:
    """The client's address as the server sees it (after trusted proxies)."""
    return request.client.host if request.client else "unknown"


class LoginThrottle:
    def __init__(self, attempts_per_minute: int) -> None:
        self._limit = RateLimitItemPerMinute(attempts_per_minute)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._executor = ThreadPoolExecutor(
            HASH_WORKERS, thread_name_prefix="ssehub-hash", initializer=_lower_priority
        )
        self._in_flight = 0

    def check(self, address: str, username: str) -> None:
        """429 with ``Retry-After`` if this address or this username has failed too
        often in the last minute; checked before any hashing or query."""
        for key in (("address", address), ("username", username)):
            if not self._limiter.test(self._limit, *key):
                reset_at = self._limiter.get_window_stats(self._limit, *key).reset_time
                raise TooManyRequests(
                    "Too many failed attempts; retry later", retry_after=reset_at - time.time()
                )

    def failed(self, address: str, username: str) -> None:
        """Count one failed attempt against the address and the username."""
        self._limiter.hit(self._limit, "address", address)
        self._limiter.hit(self._limit, "username", username)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """A place among the ``HASH_WORKERS + HASH_WAITING`` logins or registrations
        in progress; 429 at once when there is none."""
        if self._in_flight >= HASH_WORKERS + HASH_WAITING:
            raise TooManyRequests("Too many logins at once; retry shortly")
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def run(self, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` (a hash or a verification) in the hashing pool; call it
        within a ``slot``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, work, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
