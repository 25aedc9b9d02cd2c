"""TCP proxies that put faults between ssehub and what it talks to.

Each listens on a free port of 127.0.0.1 and relays to a target with threads:
``TcpProxy`` cuts or stalls every connection (a NATS path that breaks or
slows), ``CuttableProxy`` cuts one Postgres connection on the server's side
only, ``RecordingProxy`` keeps every byte its clients sent.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from app.db import asyncpg_dsn


def unread_bytes(s: socket.socket) -> int:
    """Bytes that arrived on ``s`` and are not read yet (0 once it is closed)."""
    with contextlib.suppress(OSError):
        buf = fcntl.ioctl(s.fileno(), termios.FIONREAD, struct.pack("i", 0))
        count: int = struct.unpack("i", buf)[0]
        return count
    return 0


class TcpProxy:
    """127.0.0.1:``port`` to a target port, two pumping threads per connection.

    ``cut`` closes every connection and refuses new ones for a while (a broken
    network path); ``stall`` stops reading what the target sends to the
    client, lets it pile up in the kernel, then passes it on in one burst."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._upstreams: list[socket.socket] = []
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._refuse_until = 0.0
        self._stalled = threading.Event()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=1)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self._upstreams.append(upstream)
                self.connections += 1
            done = threading.Semaphore(0)
            threading.Thread(target=self._pump, args=(client, upstream, done), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, done), daemon=True).start()
            threading.Thread(target=self._close, args=(client, upstream, done), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
        to_client = src in self._upstreams
        try:
            while True:
                while to_client and self._stalled.is_set():
                    time.sleep(0.005)
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # the other pump's recv returns too
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            done.release()

    def _close(self, client: socket.socket, upstream: socket.socket, done: Any) -> None:
        done.acquire()
        done.acquire()
        with self._lock:
            self._pairs.remove((client, upstream))
            self._upstreams.remove(upstream)
        client.close()
        upstream.close()

    def cut(self, refuse_for: float) -> None:
        self._refuse_until = time.monotonic() + refuse_for
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stall(self, until_bytes: int, timeout: float) -> int:
        """Hold back what the target sends until ``until_bytes`` wait (or
        ``timeout``), then let it all through; returns the bytes held."""
        self._stalled.set()
        held = 0
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and held < until_bytes:
                time.sleep(0.02)
                with self._lock:
                    held = sum(unread_bytes(s) for s in self._upstreams)
        finally:
            self._stalled.clear()
        return held

    def close(self) -> None:
        self._listener.close()
        self.cut(0)


SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
GSS_REQUEST = (8).to_bytes(4, "big") + (80877104).to_bytes(4, "big")


class CuttableProxy:
    """A proxy to Postgres (over TCP or its Unix socket) that can cut one
    connection on the server's side only: the backend keeps running (and may
    commit) without being told. Connections are known by their backend's pid,
    read from the server's BackendKeyData; so the proxy answers a client's
    request for encryption itself with "no", and the bytes stay readable.
    While ``refusing``, a new connection is closed at once (Postgres away)."""

    @classmethod
    def to(cls, database_url: str) -> tuple[CuttableProxy, str]:
        """A proxy to the Postgres of ``database_url``, and that URL through it."""
        from tests.support.db import postgres_address, with_database

        parts = urlsplit(asyncpg_dsn(database_url))
        proxy = cls(*postgres_address(database_url))
        base = f"postgresql+asyncpg://{parts.username}@127.0.0.1:{proxy.port}/x"
        return proxy, with_database(base, parts.path.lstrip("/"))

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.refusing = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.pairs: dict[int, tuple[socket.socket, socket.socket]] = {}  # by backend pid
        self.cut_sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                down, _ = self.listener.accept()
                threading.Thread(target=self._serve, args=(down,), daemon=True).start()

    def _connect(self) -> socket.socket:
        host, port = self.target
        if not host.startswith("/"):
            return socket.create_connection((host, port))
        up = socket.socket(socket.AF_UNIX)
        up.connect(f"{host}/.s.PGSQL.{port}")
        return up

    def _serve(self, down: socket.socket) -> None:
        if self.refusing:
            down.close()
            return
        with contextlib.suppress(OSError):
            first = receive_exactly(down, 8)
            while first in (SSL_REQUEST, GSS_REQUEST):
                down.sendall(b"N")
                first = receive_exactly(down, 8)
            up = self._connect()
            up.sendall(first)
            threading.Thread(target=self._pump, args=(down, up), daemon=True).start()
            if self._relay_until_backend_key(up, down):
                self._pump(up, down)

    def _relay_until_backend_key(self, up: socket.socket, down: socket.socket) -> bool:
        """Relay the server's first messages; register the pair under the pid of
        BackendKeyData ('K') before the client can see it. False if it ended first."""
        buffer = b""
        while data := up.recv(65536):
            buffer += data
            at = 0
            while len(buffer) - at >= 5:
                kind, length = buffer[at : at + 1], int.from_bytes(buffer[at + 1 : at + 5], "big")
                if len(buffer) - at < 1 + length:
                    break
                if kind == b"K":
                    self.pairs[int.from_bytes(buffer[at + 5 : at + 9], "big")] = (down, up)
                    down.sendall(buffer)
                    return True
                at += 1 + length
            down.sendall(buffer[:at])
            buffer = buffer[at:]
        return False

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Bytes from ``src`` to ``dst``; its end too, unless the pair was cut."""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            if not any(down in self.cut_sockets for down in (src, dst)):
                dst.shutdown(socket.SHUT_WR)

    def cut(self, backend_pid: int) -> None:
        """Close the connection to the client; keep the one to Postgres open."""
        down, _ = self.pairs[backend_pid]
        self.cut_sockets.add(down)
        with contextlib.suppress(OSError):
            down.shutdown(socket.SHUT_RDWR)
        down.close()

    def close(self) -> None:
        self.listener.close()
        for down, up in self.pairs.values():
            for sock in (down, up):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class RecordingProxy:
    """127.0.0.1:``port`` to a target port; keeps every byte its clients sent."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sent = bytearray()
        self._sockets: list[socket.socket] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def sent(self) -> bytes:
        with self._lock:
            return bytes(self._sent)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self._sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            s.close()
