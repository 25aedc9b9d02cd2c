"""Subscriber outboxes and hub fan-out as plain unit tests (no ssehub server; the
direct write's contract with uvicorn is checked on a bare uvicorn)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn

from app.events.log import StoredEvent
from app.metrics import Metrics
from app.realtime.hub import SEND_TIMEOUT_SECONDS, Hub
from app.realtime.sse import http_chunk
from app.realtime.stream import uvicorn_cycle
from app.realtime.subscriber import MAX_OUTBOX_FRAMES, Subscriber
from tests.support import free_port

AT = datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)


def _event(
    id_: int, channel_id: int = 1, type_: str = "message", data: str = '{"a":1}'
) -> StoredEvent:
    return StoredEvent(id_, channel_id, "news", type_, data, AT)


def test_fan_out_encodes_once_and_shares_the_bytes() -> None:
    hub = Hub(Metrics(), max_streams_per_user=5)
    subs = [Subscriber(i, False, {1: "news"}, False) for i in range(3)]
    for sub in subs:
        hub.register(sub)
    hub.fan_out([_event(7)])
    frames = [sub.take()[1][0] for sub in subs]
    assert frames[0] is frames[1] is frames[2]
    assert hub.position == 7


def test_full_outbox_switches_to_catch_up_without_growing() -> None:
    sub = Subscriber(1, False, {1: "news"}, False)
    for i in range(1, MAX_OUTBOX_FRAMES + 1):
        assert sub.offer(i, b"x", 0.0) is False
    assert sub.offer(MAX_OUTBOX_FRAMES + 1, b"x", 0.0) is True  # overflowed
    assert sub.lagging and not sub.outbox
    assert sub.offer(MAX_OUTBOX_FRAMES + 2, b"x", 0.0) is False  # ignored while lagging
    assert not sub.outbox


def test_stale_frames_are_dropped_after_replay() -> None:
    sub = Subscriber(1, False, {1: "news"}, False)
    for i in (3, 4, 5, 6):
        sub.offer(i, b"%d" % i, 0.0)
    sub.notify(b"notice")
    sub.position = 4  # the replay got up to 4
    ids, frames, _times = sub.take()
    assert ids == [5, 6, 0] and frames == [b"5", b"6", b"notice"]


def test_per_user_limit_and_unregister() -> None:
    hub = Hub(Metrics(), max_streams_per_user=1)
    first = Subscriber(1, False, {1: "news"}, False)
    hub.register(first)
    try:
        hub.register(Subscriber(1, False, {1: "news"}, False))
        raise AssertionError("expected 429")
    except Exception as exc:
        assert type(exc).__name__ == "TooManyRequests"
    hub.unregister(first)
    hub.register(Subscriber(1, False, {1: "news"}, False))


def test_revoke_tells_and_ends_single_channel_streams() -> None:
    hub = Hub(Metrics(), max_streams_per_user=5)
    single = Subscriber(1, False, {1: "news"}, False)
    multi = Subscriber(1, False, {1: "news", 2: "other"}, True)
    hub.register(single)
    hub.register(multi)
    hub.revoke(hub.subscribers_of(1), 1, "news")
    assert single.closed and not multi.closed
    assert multi.channels == {2: "other"}
    assert b"ssehub.channel_removed" in multi.take()[1][0]
    hub.fan_out([_event(9, channel_id=1)])
    assert multi.take() == ([], [], [])


def test_a_fan_out_wakes_a_waiting_writer() -> None:
    async def scenario() -> None:
        hub = Hub(Metrics(), max_streams_per_user=5)
        sub = Subscriber(1, False, {1: "news"}, False)  # no write_now: always the writer
        hub.register(sub)
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, hub.fan_out, [_event(1)])
        started = loop.time()
        await asyncio.wait_for(sub.wait(), 5)
        assert loop.time() - started < 1 and list(sub.outbox_ids) == [1]

    asyncio.run(scenario())


def test_tick_wakes_heartbeats_and_closes_expired_streams() -> None:
    async def scenario() -> None:
        hub = Hub(Metrics(), max_streams_per_user=5)
        idle = Subscriber(1, False, {1: "news"}, False, last_write=time.monotonic() - 10)
        fresh = Subscriber(2, False, {1: "news"}, False)
        expired = Subscriber(3, False, {1: "news"}, False, expires_at=time.time() - 1)
        for sub in (idle, fresh, expired):
            hub.register(sub)
        waiting = asyncio.ensure_future(idle.wait())
        await asyncio.sleep(0)
        hub.tick(heartbeat=5, slack=1)
        await asyncio.wait_for(waiting, 1)  # woken by the tick
        assert idle.heartbeat_due and not idle.closed
        assert not fresh.heartbeat_due and not fresh.closed
        assert expired.closed == "expired"

    asyncio.run(scenario())


def test_tick_cancels_a_send_stuck_past_the_timeout() -> None:
    async def scenario() -> None:
        hub = Hub(Metrics(), max_streams_per_user=5)
        stuck, sending = (Subscriber(i, False, {1: "news"}, False) for i in (1, 2))
        for sub in (stuck, sending):
            hub.register(sub)
            sub.writer = asyncio.create_task(asyncio.sleep(60))
        stuck.sending_since = time.monotonic() - SEND_TIMEOUT_SECONDS - 1
        sending.sending_since = time.monotonic() - 1
        await asyncio.sleep(0)
        hub.tick(heartbeat=15, slack=1)
        await asyncio.sleep(0)
        assert stuck.closed == "stalled" and stuck.writer.cancelled()
        assert sending.closed is None and not sending.writer.done()
        sending.writer.cancel()

    asyncio.run(scenario())


def test_an_idle_stream_is_written_to_without_waking_its_writer() -> None:
    async def scenario() -> None:
        hub = Hub(Metrics(), max_streams_per_user=5)
        socket: list[bytes] = []
        takes = True

        def write_now(chunk: bytes) -> bool:
            if takes:
                socket.append(chunk)
            return takes

        sub = Subscriber(1, False, {1: "news"}, False, write_now=write_now)
        hub.register(sub)
        hub.fan_out([_event(1)])  # the writer is not parked yet: queued
        assert socket == [] and list(sub.outbox_ids) == [1]
        sub.take()
        parked = asyncio.ensure_future(sub.wait())
        await asyncio.sleep(0)
        hub.fan_out([_event(2), _event(3)])  # one run: one write, framed for the socket
        assert len(socket) == 1 and socket[0].count(b"id: ") == 2
        size, _, rest = socket[0].partition(b"\r\n")
        assert int(size, 16) == len(rest) - 2 and rest.endswith(b"\n\n\r\n")
        assert sub.position == 3 and not sub.outbox and not parked.done()
        hub.fan_out([_event(3)])  # stale (already written): dropped
        assert len(socket) == 1 and not sub.outbox
        takes = False  # the socket is full: left for the writer, which is woken
        hub.fan_out([_event(4)])
        assert len(socket) == 1 and list(sub.outbox_ids) == [4]
        await asyncio.wait_for(parked, 1)
        assert hub._metrics.deliveries.total == 2

    asyncio.run(scenario())


def test_runs_on_several_channels_reach_a_stream_in_id_order() -> None:
    """A page mixing channels is written run by run; once a run is queued for
    the writer, later runs queue behind it instead of overtaking it."""

    async def scenario() -> None:
        hub = Hub(Metrics(), max_streams_per_user=5)
        socket: list[bytes] = []
        refuse = 0  # how many writes the socket refuses next

        def write_now(chunk: bytes) -> bool:
            nonlocal refuse
            if refuse:
                refuse -= 1
                return False
            socket.append(chunk)
            return True

        sub = Subscriber(1, False, {1: "news", 2: "sport"}, True, write_now=write_now)
        hub.register(sub)
        parked = asyncio.ensure_future(sub.wait())
        await asyncio.sleep(0)
        hub.fan_out([_event(1), _event(2, channel_id=2), _event(3), _event(4)])
        ids = [int(line[4:]) for line in b"".join(socket).split(b"\n") if line.startswith(b"id: ")]
        assert ids == [1, 2, 3, 4] and len(socket) == 3
        sub.position = 5  # as if a replay had got ahead of the live tail
        await asyncio.sleep(0)
        assert not parked.done()
        hub.fan_out([_event(5), _event(6)])  # 5 is stale: the run is offered event by event
        assert list(sub.outbox_ids) == [6] and len(socket) == 3
        await asyncio.wait_for(parked, 1)
        assert hub._metrics.deliveries.total == 4
        sub.take()
        parked = asyncio.ensure_future(sub.wait())
        await asyncio.sleep(0)
        refuse = 1  # the first run is refused: the second, accepted, must queue behind it
        hub.fan_out([_event(7), _event(8, channel_id=2)])
        assert sub.outbox_ids == [7, 8] and len(socket) == 3
        await asyncio.wait_for(parked, 1)

    asyncio.run(scenario())


def test_uvicorn_cycle_is_found_and_takes_chunks_between_sends() -> None:
    """The direct write relies on uvicorn's httptools cycle (``uvicorn_cycle``):
    a real uvicorn on a real socket must be recognised, stream chunked, and
    accept an ``http_chunk`` written to its transport between two ``send``s as
    part of the body an HTTP client reads. If uvicorn changes, this fails rather
    than the optimisation silently switching itself off."""
    found: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        cycle = uvicorn_cycle(send)
        found.append(cycle)
        await send({"type": "http.response.body", "body": b"one\n", "more_body": True})
        if cycle is not None and cycle.chunked_encoding is True:
            cycle.transport.write(http_chunk(b"two\n"))
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
    assert found and found[0] is not None and found[0].chunked_encoding is True
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.content == b"one\ntwo\nthree\n"
