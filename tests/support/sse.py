"""A small SSE client over a raw socket, for tests that need full control.

It reads in a background thread, de-chunks the HTTP body, parses frames, and
can be cut at any moment (``close``) like a dropped connection. ``paused``
stops reading from the socket, to play a reader that has stopped reading;
``pause_after`` sets it from the reading thread once that many events have
arrived, so the reader stops at a known place (give or take one ``recv``).
``unread`` tells how many bytes the kernel holds for it meanwhile, and
``server_send_room`` how much more the server's side may write.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tests.support.proxies import unread_bytes


@dataclass
class Frame:
    id: int | None = None
    event: str = "message"
    data: str = ""
    comment: bool = False
    at: float = 0.0  # time.monotonic() when the reader parsed it: when it arrived

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SseStream:
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    rcvbuf: int | None = None
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    raw: bytearray = field(default_factory=bytearray)
    frames: list[Frame] = field(default_factory=list)
    ended: bool = False
    paused: threading.Event = field(default_factory=threading.Event)
    pause_after: int | None = None  # events after which the reader sets ``paused`` itself

    def __post_init__(self) -> None:
        self._event_count = 0
        parts = urlsplit(self.url)
        self._sock = socket.socket()
        if self.rcvbuf:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        self._sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        self._sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError("no response headers")

    # -- reading --------------------------------------------------------------

    def _read(self) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = self._sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode().split("\r\n")
            self.status = int(status_line.split()[1])
            for line in header_lines:
                k, _, v = line.partition(":")
                self.response_headers[k.strip().lower()] = v.strip()
            self._started.set()
            chunked = self.response_headers.get("transfer-encoding") == "chunked"
            body = _Dechunker() if chunked else None
            pending = bytearray()  # bytes after the last complete frame
            while True:
                if buf:
                    data = body.feed(buf) if body else buf
                    buf = b""
                    with self._lock:
                        self.raw += data
                    pending += data
                    end = pending.rfind(b"\n\n")
                    if end >= 0:  # parse only complete frames; no quadratic re-copying
                        self._parse(bytes(pending[: end + 2]))
                        del pending[: end + 2]
                    if body is not None and body.done:
                        return
                while self.paused.is_set():
                    time.sleep(0.01)
                buf = self._sock.recv(65536)
                if not buf:
                    return
        except OSError:
            return
        finally:
            self.ended = True
            self._started.set()

    def _parse(self, text: bytes) -> None:
        arrived = time.monotonic()
        for block in text.split(b"\n\n")[:-1]:
            frame = Frame(at=arrived)
            lines = block.decode().split("\n")
            if all(line.startswith(":") for line in lines if line):
                frame.comment = True
            for line in lines:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "id":
                    frame.id = int(value)
                elif name == "event":
                    frame.event = value
                elif name == "data":
                    frame.data = value
            with self._lock:
                self.frames.append(frame)
            if frame.id is not None:
                self._event_count += 1
                if self.pause_after is not None and self._event_count >= self.pause_after:
                    self.pause_after = None  # once: clearing ``paused`` reads on
                    self.paused.set()

    # -- asking ---------------------------------------------------------------

    def events(self) -> list[Frame]:
        with self._lock:
            return [f for f in self.frames if f.id is not None]

    def ids(self) -> list[int]:
        return [f.id for f in self.events() if f.id is not None]

    def notices(self, event: str | None = None) -> list[Frame]:
        with self._lock:
            return [
                f
                for f in self.frames
                if f.id is None and not f.comment and (event is None or f.event == event)
            ]

    def present(self, channel: str) -> list[str]:
        """Who is online in ``channel`` as a client keeps it from this stream's
        notices: the last ``ssehub.presence``, then each join and leave, in order.
        Fails on a join of someone listed or a leave of someone not listed (a
        notice told twice, or one missed); empty before the first list."""
        users: list[str] | None = None
        for frame in self.notices():
            if frame.event not in ("ssehub.presence", "ssehub.join", "ssehub.leave"):
                continue
            data = frame.json
            if not isinstance(data, dict) or data.get("channel") != channel:
                continue
            if frame.event == "ssehub.presence":
                users = [user["username"] for user in data["users"]]
                continue
            assert users is not None, f"{frame.event} before the list"
            name = data["username"]
            if frame.event == "ssehub.join":
                assert name not in users, f"join told twice: {data}"
                users = sorted([*users, name], key=str.encode)
            else:
                assert name in users, f"leave of someone not listed: {data}"
                users.remove(name)
        return users if users is not None else []

    def wait_for(self, predicate: Callable[[SseStream], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return
            time.sleep(0.01)
        ids = self.ids()
        tail = [(f.id, f.event, f.data[:80]) for f in self.frames[-5:]]
        raise AssertionError(
            f"timed out: {len(ids)} events (last ids {ids[-5:]}); last frames {tail}"
        )

    def wait_ids(self, count: int, timeout: float = 10) -> list[int]:
        self.wait_for(lambda s: len(s.ids()) >= count, timeout)
        return self.ids()

    @property
    def local_port(self) -> int:
        """This end's port: the peer port the server sees (while open)."""
        port: int = self._sock.getsockname()[1]
        return port

    def unread(self) -> int:
        """Bytes that arrived on the socket and that this client has not read (yet)."""
        return unread_bytes(self._sock)

    def server_send_room(self) -> int:
        """How much more the server's end of this connection can queue before its
        writes wait for this client to read: its send buffer's size less what it
        holds, as the kernel counts them (``ss -m``: the server runs on this machine)."""
        server_port, port = self._sock.getpeername()[1], self._sock.getsockname()[1]
        shown = subprocess.run(
            ["ss", "-tnmH", f"( sport = :{server_port} and dport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        memory = re.search(r"\btb(\d+),.*\bw(\d+),", shown)  # skmem:(...,tb SIZE,...,w HELD,...)
        assert memory is not None, f"no server end of this connection: {shown!r}"
        return int(memory[1]) - int(memory[2])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


class _Dechunker:
    """HTTP chunked body to bytes, handed on as they arrive (not chunk by chunk:
    the server writes a whole replay page as one chunk)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # bytes of the current chunk still to come
        self._trailer = False  # the CRLF after the current chunk's data is due
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while self._buf and not self.done:
            if self._left:
                take = min(self._left, len(self._buf))
                out += self._buf[:take]
                del self._buf[:take]
                self._left -= take
                self._trailer = self._left == 0
                continue
            if self._trailer:
                if len(self._buf) < 2:
                    break
                del self._buf[:2]
                self._trailer = False
                continue
            end = self._buf.find(b"\r\n")
            if end < 0:
                break
            size = int(bytes(self._buf[:end]).split(b";")[0], 16)
            del self._buf[: end + 2]
            if size == 0:
                self.done = True
            self._left = size
        return bytes(out)
