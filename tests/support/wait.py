"""Waiting for an observable state instead of sleeping for a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
POLL_SECONDS = 0.02


def wait_until(
    predicate: Callable[[], bool],
    what: str | Callable[[], str] = "a condition",
    timeout: float = 10,
) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds.
    ``what`` may be a function, to say what the state was when time ran out (a
    server's log, the rows seen last)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {_said(what)}"
        time.sleep(POLL_SECONDS)


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    what: str | Callable[[], str] = "a condition",
    timeout: float = 10,
) -> T:
    """``wait_until`` for an async ``check``: poll it until it answers something
    other than None or False, and return that; fail naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {_said(what)}"
        await asyncio.sleep(POLL_SECONDS)


def _said(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()
