"""``Stream`` in process: the hub's calls, its outbox and its writer task, on
uvicorn's own response cycle over a socket that records bytes (no server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from app.events.log import Gap, Page, StoredEvent
from app.metrics import Metrics
from app.realtime.broker import PostgresBroker
from app.realtime.direct_write import client_left
from app.realtime.hub import Hub
from app.realtime.presence import Presence
from app.realtime.replay import SharedPage
from app.realtime.stream import MAX_OUTBOX_FRAMES, Stream
from tests.unit.realtime.cycle import Socket, uvicorn_cycle

AT = datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC)


def _event(id_: int, channel_id: int = 1) -> StoredEvent:
    return StoredEvent(id_, channel_id, "news", "message", '{"a":1}', AT)


class Pages:
    """The replay's log: the events given, after the id asked, in one page, once
    the test lets the read finish (``release``)."""

    def __init__(self, events: list[StoredEvent], gaps: list[Gap] | None = None) -> None:
        self.events = events
        self.gaps = gaps or []
        self.asked: list[int] = []
        self.released = asyncio.Event()
        self.released.set()

    async def page(
        self, channel_ids: Collection[int], after: int, registered_at: int
    ) -> SharedPage:
        self.asked.append(after)
        await self.released.wait()
        events = [e for e in self.events if e.id > after and e.channel_id in channel_ids]
        return SharedPage(Page(events, self.gaps, False), frozenset(channel_ids))


def _stream(
    hub: Hub,
    channels: dict[int, str] | None = None,
    follows: bool = False,
    resume_from: int | None = None,
    pages: Pages | None = None,
    expires_at: float = float("inf"),
) -> Stream:
    stream = Stream(
        1,
        dict(channels or {1: "news"}),
        follows,
        expires_at,
        resume_from,
        hub=hub,
        replays=pages or Pages([]),
        pool=None,
        metrics=hub._metrics,
        presence=Presence(None, hub, hub._metrics, grace=5, ttl=15),  # no presence channel
    )
    hub.register(stream)
    return stream


class Running:
    """A registered stream whose writer runs on uvicorn's cycle over a ``Socket``."""

    def __init__(self, hub: Hub, stream: Stream) -> None:
        self.socket = Socket()
        self.cycle = uvicorn_cycle(self.socket)
        self.stream = stream
        self.task = asyncio.ensure_future(stream.run({}, _never, self.cycle.send))

    async def parked(self) -> None:
        """Until the writer waits with nothing to do."""
        await _settle()


async def _settle() -> None:
    """Let every task run until it waits (the test's socket never blocks)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def _never() -> Any:
    await asyncio.Event().wait()


def _sample(hub: Hub, name: str) -> float:
    value = hub._metrics.registry.get_sample_value(name)
    return value or 0.0


def test_fan_out_encodes_once_and_shares_the_bytes() -> None:
    hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
    streams = [_stream(hub) for _ in range(3)]
    hub.deliver([_event(7)], through=9)
    frames = [stream.take()[1][0] for stream in streams]
    assert frames[0] is frames[1] is frames[2]
    assert hub.position == 9  # past the ids between, too


def test_a_full_outbox_switches_to_catch_up_without_growing() -> None:
    hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
    stream = _stream(hub)
    stream.notify(b"notice")
    for i in range(1, MAX_OUTBOX_FRAMES):
        stream.offer(i, b"x", 0.0)
    assert not stream.lagging
    stream.offer(MAX_OUTBOX_FRAMES, b"x", 0.0)  # the bound: the reader is too slow
    assert stream.lagging
    assert _sample(hub, "ssehub_slow_reader_catchups_total") == 1
    stream.offer(MAX_OUTBOX_FRAMES + 1, b"x", 0.0)  # ignored while lagging
    assert stream.take() == ([0], [b"notice"], [0.0]), "events dropped, notices kept"
    assert _sample(hub, "ssehub_slow_reader_catchups_total") == 1


def test_a_lagging_stream_catches_up_from_the_log_and_goes_live_again() -> None:
    async def scenario() -> None:
        pages = Pages([_event(n) for n in range(1, MAX_OUTBOX_FRAMES + 3)])
        hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
        running = Running(hub, _stream(hub, pages=pages))
        running.cycle.flow.pause_writing()  # the reader stops reading: nothing written
        await running.parked()
        hub.fan_out([_event(n) for n in range(1, MAX_OUTBOX_FRAMES + 2)])
        assert running.stream.lagging
        running.cycle.flow.resume_writing()
        await running.parked()
        assert pages.asked == [0] and not running.stream.lagging
        hub.fan_out([_event(MAX_OUTBOX_FRAMES + 2)])  # already replayed: stale
        hub.fan_out([_event(MAX_OUTBOX_FRAMES + 3)])  # live again, written directly
        assert running.socket.ids() == list(range(1, MAX_OUTBOX_FRAMES + 4))
        assert hub._metrics.deliveries.direct_writes == 1
        running.stream.close("test")
        await running.task

    asyncio.run(scenario())


def test_replay_then_live_without_gap_or_duplicate() -> None:
    """Registered before the replay reads: what is fanned out meanwhile is queued,
    and what the replay also read is dropped from the queue as stale (``take``)."""

    async def scenario() -> None:
        hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
        hub.position = 4
        pages = Pages([_event(n) for n in (1, 2, 3, 4, 5)])
        pages.released.clear()  # the replay's read is slow
        running = Running(hub, _stream(hub, resume_from=0, pages=pages))
        await running.parked()
        hub.fan_out([_event(5), _event(6)])  # committed during the read: queued
        running.stream.notify(b"event: note\ndata: {}\n\n")
        pages.released.set()  # the read saw 1..5
        await running.parked()
        assert running.socket.ids() == [1, 2, 3, 4, 5, 6]
        assert b"event: note" in running.socket.data
        assert b'"replayed":5' in running.socket.data
        assert running.stream.position == 6
        running.stream.close("test")
        await running.task

    asyncio.run(scenario())


def test_an_idle_stream_is_written_to_without_waking_its_writer() -> None:
    async def scenario() -> None:
        hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
        stream = _stream(hub)
        hub.fan_out([_event(1)])  # the writer has not started: queued
        running = Running(hub, stream)
        await running.parked()
        assert running.socket.ids() == [1] and hub._metrics.deliveries.direct_writes == 0
        writes = running.socket.writes
        hub.fan_out([_event(2), _event(3)])  # one run: one write, framed for the socket
        assert running.socket.writes == writes + 1 and running.socket.ids() == [1, 2, 3]
        assert stream.position == 3 and hub._metrics.deliveries.direct_writes == 1
        hub.fan_out([_event(3)])  # stale (already written): dropped
        assert running.socket.writes == writes + 1
        running.cycle.flow.pause_writing()  # the socket is full: left to the writer
        hub.fan_out([_event(4)])
        assert running.socket.writes == writes + 1
        running.cycle.flow.resume_writing()
        await running.parked()
        assert running.socket.ids() == [1, 2, 3, 4]
        assert hub._metrics.deliveries.direct_writes == 1
        assert hub._metrics.deliveries.total == 4
        stream.close("test")
        await running.task

    asyncio.run(scenario())


def test_no_direct_write_while_lagging_or_closing() -> None:
    async def scenario() -> None:
        hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
        lagging, closing = _stream(hub), _stream(hub)
        runs = [Running(hub, stream) for stream in (lagging, closing)]
        await runs[0].parked()
        lagging.catch_up()
        closing.close("test")
        hub.fan_out([_event(1)])  # neither is written: not by the hub
        assert hub._metrics.deliveries.direct_writes == 0
        await runs[0].parked()
        lagging.close("test")
        await asyncio.gather(*(run.task for run in runs))
        assert runs[0].socket.ids() == [] and runs[1].socket.ids() == []

    asyncio.run(scenario())


def test_runs_on_several_channels_reach_a_stream_in_id_order() -> None:
    """A page mixing channels is written run by run; once a run is queued for
    the writer, later runs queue behind it instead of overtaking it."""

    async def scenario() -> None:
        hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
        stream = _stream(hub, {1: "news", 2: "sport"}, follows=True)
        running = Running(hub, stream)
        await running.parked()
        hub.fan_out([_event(1), _event(2, channel_id=2), _event(3), _event(4)])
        assert hub._metrics.deliveries.direct_writes == 3
        running.socket.refuse = 1  # the first run is refused: the second must queue behind
        hub.fan_out([_event(5), _event(6, channel_id=2)])
        assert hub._metrics.deliveries.direct_writes == 3
        await running.parked()
        assert running.socket.ids() == [1, 2, 3, 4, 5, 6]
        stream.close("test")
        await running.task

    asyncio.run(scenario())


def test_a_gap_is_told_once_and_only_past_what_was_delivered() -> None:
    hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
    stream = _stream(hub)
    assert not stream.gap_to_tell(1, pruned_through=5, after=5)  # delivered up to it
    assert stream.gap_to_tell(1, pruned_through=8, after=5)
    assert not stream.gap_to_tell(1, pruned_through=8, after=0)  # told already
    assert stream.gap_to_tell(1, pruned_through=9, after=0)  # more pruned since
    assert stream.gap_to_tell(2, pruned_through=8, after=5)  # another channel


def test_a_gap_makes_a_stream_catch_up_and_tell_it() -> None:
    async def scenario() -> None:
        hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
        gap = Gap(1, "news", pruned_through=3, oldest_id=4)
        pages = Pages([_event(4)], [gap])
        running = Running(hub, _stream(hub, pages=pages))
        await running.parked()
        hub.mark_gap(gap)
        await running.parked()
        data = bytes(running.socket.data)
        assert data.index(b"ssehub.truncated") < data.index(b"id: 4")
        hub.mark_gap(gap)  # the same gap again: no news, no second notice
        await running.parked()
        assert running.socket.data.count(b"ssehub.truncated") == 1
        running.stream.close("test")
        await running.task

    asyncio.run(scenario())


def test_revoke_tells_and_ends_single_channel_streams() -> None:
    async def scenario() -> None:
        hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
        single = _stream(hub)
        multi = _stream(hub, {1: "news", 2: "other"}, follows=True)
        runs = [Running(hub, stream) for stream in (single, multi)]
        await runs[0].parked()
        hub.revoke(hub.subscribers_of(1), 1, "news")
        await asyncio.wait_for(runs[0].task, 1)  # ended, after its notice
        assert b'"channel":"news"' in runs[0].socket.data
        assert runs[0].socket.data.endswith(b"0\r\n\r\n")
        await runs[1].parked()
        assert multi.closed is None and multi.channels == {2: "other"}
        assert b'"channel":"news"' in runs[1].socket.data
        assert not hub.subscribers_of(1) and hub.all_streams() == [multi]
        hub.fan_out([_event(9, channel_id=1)])
        assert runs[1].socket.ids() == []
        multi.close("test")
        await runs[1].task
        assert hub.all_streams() == []

    asyncio.run(scenario())


def test_tick_wakes_heartbeats_and_closes_expired_and_disconnected_streams() -> None:
    async def scenario() -> None:
        hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
        idle, left = _stream(hub), _stream(hub)
        expired = _stream(hub, expires_at=time.time() - 1)
        runs = {stream: Running(hub, stream) for stream in (idle, left, expired)}
        await runs[idle].parked()
        hub.tick(heartbeat=15, slack=1)  # no heartbeat due; the token has expired
        await asyncio.wait_for(runs[expired].task, 1)
        assert expired.closed == "expired" and idle.closed is None
        assert runs[expired].socket.data.endswith(
            b"event: ssehub.expired\ndata: {}\n\n\r\n0\r\n\r\n"
        )
        assert b": keep-alive" not in runs[idle].socket.data
        hub.tick(heartbeat=0.5, slack=1)  # every stream is due a heartbeat
        await runs[idle].parked()
        assert b": keep-alive" in runs[idle].socket.data
        runs[left].cycle.disconnected = True  # read on uvicorn's cycle by the tick
        hub.tick(heartbeat=15, slack=1)
        await asyncio.wait_for(runs[left].task, 1)
        assert left.closed == "disconnected" and idle.closed is None
        client_left(runs[idle].cycle)  # as ssehub's server protocol tells it
        await asyncio.wait_for(runs[idle].task, 1)
        assert idle.closed == "disconnected" and hub.all_streams() == []

    asyncio.run(scenario())


def test_tick_cancels_a_send_stuck_past_the_timeout() -> None:
    async def scenario() -> None:
        hub = Hub(
            Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5, send_timeout=0.05
        )
        stream = _stream(hub)
        stream.notify(b"event: note\ndata: {}\n\n")
        running = Running(hub, stream)
        await running.parked()
        running.cycle.flow.pause_writing()  # the reader takes no more bytes
        stream.notify(b"event: note\ndata: {}\n\n")
        await running.parked()
        hub.tick(heartbeat=15, slack=1)  # in time: left alone
        assert stream.closed is None
        await asyncio.sleep(0.06)
        hub.tick(heartbeat=15, slack=1)
        await asyncio.wait_for(running.task, 1)  # ends without raising
        assert stream.closed == "stalled" and hub.all_streams() == []
        assert _sample(hub, "ssehub_slow_reader_disconnects_total") == 1

    asyncio.run(scenario())


def test_per_user_limit_and_unregister() -> None:
    hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=1)
    first = _stream(hub)
    try:
        _stream(hub)
        raise AssertionError("expected 429")
    except Exception as exc:
        assert type(exc).__name__ == "TooManyRequests"
    hub.unregister(first)
    _stream(hub)


def test_under_another_server_the_writer_writes_and_a_task_waits_for_the_disconnect() -> None:
    """A ``send`` that is not uvicorn's cycle gets no direct write: fan-out wakes
    the writer, and a second task of the stream's own hears the disconnect."""

    async def scenario() -> None:
        hub = Hub(Metrics(), PostgresBroker(None, Metrics()), max_streams_per_user=5)
        stream = _stream(hub)
        sent: list[dict[str, Any]] = []
        gone = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(stream.run({}, receive, send))
        await _settle()
        hub.fan_out([_event(1)])
        await _settle()
        assert hub._metrics.deliveries.direct_writes == 0
        assert sent[-1]["body"].startswith(b"id: 1\n")
        gone.set()
        await asyncio.wait_for(task, 1)
        assert stream.closed == "disconnected" and sent[-1]["more_body"] is False
        assert hub.all_streams() == []

    asyncio.run(scenario())
