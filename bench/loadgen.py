"""The load side: raw asyncio protocols on uvloop, fast enough not to be the bottleneck.

Streams are counted, not parsed: each event carries ``"t":<publish time>``
in its data, so counting ``"t":`` occurrences counts events, and a sample
of streams also extracts those timestamps for publish-to-receive latency.
Reads and bytes are counted too: events per read says how much work each
wake-up of the generator does, so the report can tell a server that sends
many small writes (more reads per event for the generator) from one that
batches, and what the generator's own CPU went into (``bench.cost``).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

T_FIELD = b'"t":'
T_VALUE = re.compile(rb'"t": ?([0-9.]+)')


@dataclass
class Totals:
    """What all streams of one run received."""

    events: int = 0
    reads: int = 0  # data_received calls
    bytes: int = 0
    connected: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    last_event_at: float = 0.0


class StreamProtocol(asyncio.Protocol):
    """One SSE stream: counts events; a sampled one records latencies."""

    def __init__(
        self, request: bytes, totals: Totals, sample: bool, connected: asyncio.Future[bool]
    ):
        self.request = request
        self.totals = totals
        self.sample = sample
        self.connected = connected
        self.headers_done = False
        self.events = 0  # this stream's own, for "has every client caught up"
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.totals.reads += 1
        self.totals.bytes += len(data)
        if not self.headers_done:
            self.tail += data
            if b"\r\n\r\n" not in self.tail:
                return
            head, _, data = self.tail.partition(b"\r\n\r\n")
            self.tail = b""
            self.headers_done = True
            ok = head.startswith(b"HTTP/1.1 200")
            if ok:
                self.totals.connected += 1
            else:
                self.totals.failed += 1
            if not self.connected.done():
                self.connected.set_result(ok)
        chunk = self.tail + data
        # Keep the last few bytes so a marker split across reads is still seen.
        count = chunk.count(T_FIELD) - self.tail.count(T_FIELD)
        if count:
            self.events += count
            self.totals.events += count
            self.totals.last_event_at = time.time()
            if self.sample:
                now = time.time()
                for match in T_VALUE.finditer(data):
                    self.totals.latencies.append(now - float(match.group(1)))
        self.tail = chunk[-3:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.totals.failed += 1
            self.connected.set_result(False)


def get_request(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_streams(
    host: str,
    port: int,
    paths: list[str],
    totals: Totals,
    sample_every: int = 20,
    headers: dict[str, str] | None = None,
    concurrency: int = 200,
    open_times: list[float] | None = None,
) -> list[StreamProtocol]:
    """Open one stream per path, ``concurrency`` at a time; wait until each has its headers.

    ``sample_every=0`` samples no latencies (the resume scenarios' events carry no
    publish time). ``open_times`` receives each stream's seconds from connect to
    response headers.
    """
    loop = asyncio.get_running_loop()
    streams: list[StreamProtocol] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, path: str) -> None:
        async with gate:
            connected: asyncio.Future[bool] = loop.create_future()
            request = get_request(host, port, path, headers)
            sample = sample_every > 0 and i % sample_every == 0
            began = time.monotonic()
            _, stream = await loop.create_connection(
                lambda: StreamProtocol(request, totals, sample, connected), host, port
            )
            streams.append(stream)
            await asyncio.wait_for(connected, 60)
            if open_times is not None:
                open_times.append(time.monotonic() - began)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(paths)))
    return streams


def close_streams(streams: list[StreamProtocol]) -> None:
    for stream in streams:
        if stream.transport is not None:
            stream.transport.close()


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client for publishing (Content-Length bodies only)."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None):
        self.host, self.port = host, port
        self.headers = headers or {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
