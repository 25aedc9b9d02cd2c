"""NATS for the tests: ``nats-server`` processes and a raw client beside ssehub's."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import nats

from tests.support.servers import ROOT, free_port

T = TypeVar("T")
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsServer:
    """``nats-server`` on its own ports, which ``stop`` then ``start`` keep."""

    def __init__(self, *args: str) -> None:
        """``args`` are passed on as they are: ``--user``/``--pass``, ``--auth``,
        ``--tls`` with its certificate, or ``-c`` with a configuration file."""
        self.port, self.monitor_port = free_port(), free_port()
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = ROOT / ".ssehub-test" / f"nats-{self.port}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([*cmd, *self.args], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
            ):
                if s.recv(4096).startswith(b"INFO"):
                    return self
            time.sleep(0.02)
        raise RuntimeError(f"nats-server not up:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def subscriptions(self) -> list[list[str]]:
        """Each client connection's subjects (the monitoring endpoint's ``connz``)."""
        r = httpx.get(f"http://127.0.0.1:{self.monitor_port}/connz", params={"subs": 1})
        return [c.get("subscriptions_list", []) for c in r.json()["connections"]]


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
