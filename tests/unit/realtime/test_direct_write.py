"""The direct write's contract with uvicorn (``app.realtime.direct_write``).

If a uvicorn upgrade renames what the adapter reads, these fail, rather than
every stream silently falling back to its writer task."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import uvicorn

from app.realtime.direct_write import CYCLE_ATTRIBUTES, client_left, direct_writer
from app.realtime.sse import http_chunk
from tests.support import free_port
from tests.unit.realtime.cycle import Socket, uvicorn_cycle

START = {"type": "http.response.start", "status": 200, "headers": []}


def test_the_adapter_reads_uvicorns_response_cycle() -> None:
    async def scenario() -> None:
        socket = Socket()
        cycle = uvicorn_cycle(socket)
        assert all(name in vars(cycle) for name in CYCLE_ATTRIBUTES)
        assert direct_writer(cycle.send) is None, "before the response starts: not chunked yet"
        await cycle.send(START)
        direct = direct_writer(cycle.send)
        assert direct is not None and not direct.disconnected
        head = len(socket.data)
        assert direct.write_now(http_chunk(b"one\n"))
        assert bytes(socket.data[head:]) == b"4\r\none\n\r\n"
        cycle.flow.pause_writing()  # the reader's buffer is full: left to the writer
        assert not direct.write_now(b"x") and socket.writes == 2
        cycle.flow.resume_writing()
        socket.refuse = 1  # a closing transport: nothing written, no error
        assert not direct.write_now(b"x")
        told: list[str] = []
        direct.on_disconnect(lambda: told.append("gone"))
        client_left(cycle)  # as ssehub's server protocol does on connection_lost
        cycle.disconnected = True
        assert told == ["gone"] and direct.disconnected and not direct.write_now(b"x")

    asyncio.run(scenario())


def test_any_other_send_gets_no_direct_writer() -> None:
    async def scenario() -> None:
        cycle = uvicorn_cycle(Socket())
        await cycle.send(START)

        async def wrapped(message: Any) -> None:  # a middleware's wrapper
            await cycle.send(message)

        assert direct_writer(wrapped) is None
        assert direct_writer(Socket().write) is None  # type: ignore[arg-type]
        client_left(None)  # no cycle, nothing to tell

    asyncio.run(scenario())


def test_a_real_uvicorn_takes_direct_writes_between_sends() -> None:
    """On a real uvicorn over a real socket, the adapter engages, and a chunk it
    writes between two ``send``s is part of the body an HTTP client reads."""
    found: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        direct = direct_writer(send)
        found.append(direct is not None)
        await send({"type": "http.response.body", "body": b"one\n", "more_body": True})
        if direct is not None:
            direct.write_now(http_chunk(b"two\n"))
        await send({"type": "http.response.body", "body": b"three\n", "more_body": False})

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, port=port, http="httptools", log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        response = httpx.get(f"http://127.0.0.1:{port}/")
    finally:
        server.should_exit = True
        thread.join(10)
    assert found == [True]
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.content == b"one\ntwo\nthree\n"
