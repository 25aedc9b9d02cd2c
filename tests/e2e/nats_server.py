"""A neighbour on the NATS server (a raw client without ssehub's key), and polling.

The server itself is ``tests.support.NatsServer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import nats

T = TypeVar("T")


class RawNatsClient:
    """A plain nats-py client of the test's own: a neighbour on the same NATS
    server, without ssehub's key. It runs on an event loop in its own thread,
    records every message on the subjects it subscribes to, and publishes
    whatever it is told to."""

    def __init__(self, url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes]] = []
        opts = {"allow_reconnect": False, "connect_timeout": 5, **options}
        try:
            self._nc: Any = self._run(nats.connect(url, **opts))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    async def _record(self, msg: Any) -> None:
        with self._lock:
            self._messages.append((msg.subject, bytes(msg.data)))

    def subscribe(self, subject: str) -> RawNatsClient:
        self._run(self._nc.subscribe(subject, cb=self._record))
        self._run(self._nc.flush())
        return self

    def publish(self, subject: str, payload: bytes) -> None:
        """Publish and wait until the server has it: it is routed on before
        anything the test makes ssehub send afterwards."""
        self._run(self._nc.publish(subject, payload))
        self._run(self._nc.flush())

    def messages(self, suffix: str = "") -> list[tuple[str, bytes]]:
        with self._lock:
            return [m for m in self._messages if m[0].endswith(suffix)]

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._nc.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def wait_until(
    predicate: Callable[[], bool], what: str = "a condition", timeout: float = 10
) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
