"""Publishing from the application's own transaction: ``ssehub_enqueue``.

Real ``ssehub serve`` processes, a real Postgres, the application's side played
by plain asyncpg connections that call ``ssehub_enqueue`` in their own
transactions. Every enqueued event's data carries a unique mark (``"u"``), so
exactly-once can be checked by counting marks in the history and on streams.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from app.db import asyncpg_dsn
from app.events.inbox import MOVE_ROWS, SETTLE_MAX_SECONDS
from app.events.publisher import WRITER_NAME
from tests.support import Api, Server, as_role, eventually, read_history, run_cli, sql
from tests.support.sse import SseStream

ENQUEUE = "SELECT ssehub_enqueue($1, $2, $3::jsonb, $4)"


class TimedStream(SseStream):
    """An ``SseStream`` that notes when each event arrived, by id and by the
    ``"u"`` mark of its data."""

    def __post_init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self.marks: dict[str, tuple[int, float]] = {}
        super().__post_init__()

    def _parse(self, text: bytes) -> None:
        before = len(self.frames)
        super()._parse(text)
        now = time.monotonic()
        for frame in self.frames[before:]:
            if frame.id is None:
                continue
            self.arrived.setdefault(frame.id, now)
            data = frame.json["data"]
            if isinstance(data, dict) and "u" in data:
                self.marks.setdefault(str(data["u"]), (frame.id, now))

    def datas(self) -> list[Any]:
        return [frame.json["data"] for frame in self.events()]


class AdminClient:
    """Admin calls and streams on one server."""

    def __init__(self, server: Server) -> None:
        self.api = Api(server.url)
        self.admin = self.api.admin()
        self.token = self.stream_token(self.admin)

    def channel(self, name: str, **fields: Any) -> None:
        r = self.api.http.post("/channels", json={"name": name, **fields}, headers=self.admin)
        assert r.status_code == 201, r.text

    def stream_token(self, headers: dict[str, str]) -> str:
        r = self.api.http.post("/auth/stream-token", headers=headers)
        assert r.status_code == 200, r.text
        token: str = r.json()["stream_token"]
        return token

    def open(
        self, path: str, token: str | None = None, base: str | None = None, **kw: Any
    ) -> TimedStream:
        stream = TimedStream(
            f"{base or self.api.base_url}{path}?access_token={token or self.token}", **kw
        )
        stream.wait_for(lambda s: bool(s.notices("ssehub.live")))
        return stream

    def publish(self, channel: str, data: Any, key: str | None = None) -> httpx.Response:
        headers = {**self.admin, **({"Idempotency-Key": key} if key else {})}
        return self.api.http.post(
            f"/channels/{channel}/events", json={"data": data}, headers=headers
        )

    def history(self, channel: str, base: str | None = None) -> list[dict[str, Any]]:
        """The channel's whole retained history, page after page."""
        return read_history(base or self.api.base_url, self.admin, channel)


async def connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(asyncpg_dsn(database_url))


async def enqueue(
    conn: asyncpg.Connection,
    channel: str,
    data: Any,
    type_: str = "message",
    key: str | None = None,
) -> None:
    await conn.execute(ENQUEUE, channel, type_, json.dumps(data), key)


async def inbox_drained(database_url: str, timeout: float = 10) -> None:
    """Wait until every committed inbox row has been moved into the log."""

    async def empty() -> bool:
        return (await sql(database_url, "SELECT count(*) FROM ssehub_inbox"))[0][0] == 0

    await eventually(empty, "the inbox drained", timeout)


async def arrival(stream: TimedStream, mark: str, timeout: float = 10) -> tuple[int, float]:
    """(id, arrival time) of the event marked ``mark`` once it is on ``stream``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = stream.marks.get(mark)
        if got is not None:
            return got
        await asyncio.sleep(0.001)
    raise AssertionError(f"{mark} did not arrive within {timeout}s; last {stream.ids()[-5:]}")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


# -- the transaction decides ---------------------------------------------------------


async def test_commit_publishes_rollback_never_and_a_transaction_is_adjacent(
    server: Server, database_url: str
) -> None:
    hub = AdminClient(server)
    hub.channel("orders")
    stream = hub.open("/channels/orders/stream")
    app, other = await connect(database_url), await connect(database_url)
    try:
        async with app.transaction():
            await enqueue(app, "orders", {"u": "a"}, "order.paid")
            await enqueue(app, "orders", {"u": "b"}, "order.paid")
            await enqueue(app, "orders", {"u": "c"}, "order.shipped")
        rolled = app.transaction()
        await rolled.start()
        await enqueue(app, "orders", {"u": "never"})
        await enqueue(app, "orders", {"u": "never-2"})
        await rolled.rollback()
        # Two transactions interleaved, an API publish between them: each keeps
        # its own calls adjacent and in order. Which of the two goes first is not
        # promised (a mover that runs after both committed takes them in the order
        # of their first call).
        first, second = app.transaction(), other.transaction()
        await first.start()
        await second.start()
        await enqueue(app, "orders", {"u": "x1"})
        await enqueue(other, "orders", {"u": "y1"})
        assert hub.publish("orders", {"u": "api"}).status_code == 201
        await enqueue(app, "orders", {"u": "x2"})
        await enqueue(other, "orders", {"u": "y2"})
        await second.commit()
        await enqueue(app, "orders", {"u": "x3"})
        await first.commit()
        await arrival(stream, "x3")
        await inbox_drained(database_url)
    finally:
        await app.close()
        await other.close()
    history = hub.history("orders")
    marks = [e["data"]["u"] for e in history]
    assert marks[:4] == ["a", "b", "c", "api"]
    assert marks[4:] in (["y1", "y2", "x1", "x2", "x3"], ["x1", "x2", "x3", "y1", "y2"])
    ids = [e["id"] for e in history]
    runs = ((0, 3), (4, 2), (6, 3)) if marks[4] == "y1" else ((0, 3), (4, 3), (7, 2))
    for start, length in runs:  # each transaction's ids are consecutive
        assert ids[start : start + length] == list(range(ids[start], ids[start] + length))
    assert [e["type"] for e in history[:3]] == ["order.paid", "order.paid", "order.shipped"]
    assert all(e["channel"] == "orders" for e in history)
    assert stream.ids() == ids
    assert [d["u"] for d in stream.datas()] == marks


async def test_bad_calls_fail_the_callers_transaction(server: Server, database_url: str) -> None:
    hub = AdminClient(server)
    hub.channel("orders")
    limit = (await sql(database_url, "SELECT ssehub_max_event_bytes()"))[0][0]
    assert limit == 65536  # declared by the server: its SSEHUB_MAX_EVENT_BYTES
    bad: list[tuple[str, str, str, Any, str | None]] = [
        ("P0002", "nope", "message", 1, None),
        ("P0002", "@nobody", "message", 1, None),
        ("22023", "orders", "bad type", 1, None),
        ("22023", "orders", "", 1, None),
        ("22023", "orders", "x" * 65, 1, None),
        ("22023", "orders", "ssehub.live", 1, None),
        ("22023", "orders", "message", "x" * (limit - 1), None),  # limit + 1 bytes with quotes
        ("22023", "orders", "message", "é" * (limit // 2), None),  # bytes, not characters
        ("22023", "orders", "message", 1, ""),
        ("22023", "orders", "message", 1, "   "),
        ("22023", "orders", "message", 1, "\t\n \u3000\u2028"),  # blank as HTTP sees it
        ("22023", "orders", "message", 1, "k" * 201),
    ]
    conn = await connect(database_url)
    try:
        for state, channel, type_, data, key in bad:
            tr = conn.transaction()
            await tr.start()
            await enqueue(conn, "orders", {"u": "before-the-bad-call"})
            with pytest.raises(asyncpg.PostgresError) as caught:
                await enqueue(conn, channel, data, type_, key)
            assert caught.value.sqlstate == state, (channel, type_, key, caught.value)
            # The call failed the caller's transaction: nothing it did can commit.
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.execute("SELECT 1")
            await tr.rollback()
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.execute(ENQUEUE, "orders", "message", None, None)  # SQL NULL, not 'null'
        assert caught.value.sqlstate == "22023"
        # At the limit, and over it only as jsonb's spaced text: accepted.
        at_limit = "x" * (limit - 2)
        spaced = [1] * ((limit - 1) // 2)  # [1,1,...] fits; "[1, 1, ...]" would not
        assert len(json.dumps(spaced)) > limit >= len(json.dumps(spaced, separators=(",", ":")))
        async with conn.transaction():
            await enqueue(conn, "orders", at_limit)
            await enqueue(conn, "orders", spaced)
            await enqueue(conn, "orders", {"u": "last"})
        await inbox_drained(database_url)
    finally:
        await conn.close()
    datas = [e["data"] for e in hub.history("orders")]
    assert datas == [at_limit, spaced, {"u": "last"}]


async def test_personal_channels_take_enqueues(server: Server, database_url: str) -> None:
    hub = AdminClient(server)
    bob = hub.api.user("bob")
    stream = hub.open("/stream", token=hub.stream_token(bob))
    conn = await connect(database_url)
    try:
        async with conn.transaction():
            await enqueue(conn, "@bob", {"u": "for-bob"}, "note")
        event_id, _ = await arrival(stream, "for-bob")
    finally:
        await conn.close()
    mine = hub.api.http.get("/me/events", headers=bob).json()["events"]
    assert [(e["id"], e["channel"], e["type"], e["data"]) for e in mine] == [
        (event_id, "@bob", "note", {"u": "for-bob"})
    ]


async def test_an_idempotency_key_publishes_once_whichever_path_uses_it(
    server: Server, database_url: str
) -> None:
    hub = AdminClient(server)
    hub.channel("orders")
    hub.channel("other")
    first = hub.publish("orders", {"u": "http"}, key="order-42")
    assert first.status_code == 201
    conn = await connect(database_url)
    try:
        async with conn.transaction():  # the key the API used: nothing new
            await enqueue(conn, "orders", {"u": "enqueued-42"}, key="order-42")
        async with conn.transaction():  # one key twice in one transaction: once
            await enqueue(conn, "orders", {"u": "k43-first"}, key="order-43")
            await enqueue(conn, "orders", {"u": "k43-second"}, key="order-43")
            await enqueue(conn, "orders", {"u": "unkeyed"})
        async with conn.transaction():  # and again in a later transaction: still once
            await enqueue(conn, "orders", {"u": "k43-third"}, key="order-43")
        async with conn.transaction():  # keys are per channel
            await enqueue(conn, "other", {"u": "other-42"}, key="order-42")
        await inbox_drained(database_url)
    finally:
        await conn.close()
    assert [e["data"]["u"] for e in hub.history("orders")] == ["http", "k43-first", "unkeyed"]
    assert [e["data"]["u"] for e in hub.history("other")] == ["other-42"]
    # The HTTP retry of the enqueued key answers with the enqueued event.
    again = hub.publish("orders", {"u": "http-43"}, key="order-43")
    assert again.status_code == 200 and again.json()["data"] == {"u": "k43-first"}
    assert hub.publish("orders", {"u": "http-again"}, key="order-42").json() == first.json()


async def test_an_open_transaction_does_not_block_deleting_its_channel(
    server: Server, database_url: str
) -> None:
    """``ssehub_enqueue`` takes no lock on the channel: deleting it does not wait
    for the transaction, whose row for it is then dropped by the move."""
    hub = AdminClient(server)
    hub.channel("doomed")
    hub.channel("kept")
    conn = await connect(database_url)
    try:
        tr = conn.transaction()
        await tr.start()
        await enqueue(conn, "doomed", {"u": "orphan"})
        await enqueue(conn, "kept", {"u": "survivor"})
        r = await asyncio.to_thread(
            hub.api.http.delete, "/channels/doomed", headers=hub.admin, timeout=5
        )
        assert r.status_code == 204, r.text
        await tr.commit()
        await inbox_drained(database_url)
    finally:
        await conn.close()
    assert [e["data"] for e in hub.history("kept")] == [{"u": "survivor"}]
    orphans = await sql(database_url, "SELECT count(*) FROM events WHERE data LIKE '%orphan%'")
    assert orphans[0][0] == 0


async def test_data_is_stored_as_compact_json_with_its_value(
    server: Server, database_url: str
) -> None:
    hub = AdminClient(server)
    hub.channel("json")
    stream = hub.open("/channels/json/stream")
    values: list[Any] = [
        {
            "b": [1, 2.5, {"c": None, "d": [True, False]}],
            "a": {},
            "e": [],
            "n": 12345678901234567890,
        },
        {"text": 'a "quoted" line\nwith spaces, commas: colons; é ü 日本 \\ \t'},
        "a plain string",
        -3,
        0.125,
        True,
        None,
        [],
    ]
    conn = await connect(database_url)
    try:
        async with conn.transaction():
            for value in values:
                await enqueue(conn, "json", value)
        await inbox_drained(database_url)
    finally:
        await conn.close()
    stored = [r[0] for r in await sql(database_url, "SELECT data FROM events ORDER BY id")]
    assert [json.loads(text) for text in stored] == values
    assert " " not in stored[0] and stored[0].startswith('{"a":{}')  # no space anywhere
    assert stored[2:] == ['"a plain string"', "-3", "0.125", "true", "null", "[]"]
    stream.wait_ids(len(values))
    assert stream.datas() == values
    raw = httpx.get(f"{server.url}/channels/json/events", headers=hub.admin).text
    assert stored[0] in raw  # served as stored, byte for byte


# -- nobody waits for an open transaction -----------------------------------------------


async def _round(
    hub: AdminClient, stream: TimedStream, conn: asyncpg.Connection, mark: str
) -> tuple[float, float]:
    """One API publish and one enqueue, each until it is on the stream: their latencies."""
    started = time.monotonic()
    r = await asyncio.to_thread(hub.publish, "busy", {"u": f"{mark}-api"})
    assert r.status_code == 201, r.text
    _, at = await arrival(stream, f"{mark}-api", timeout=5)
    api = at - started
    async with conn.transaction():
        await enqueue(conn, "busy", {"u": f"{mark}-sql"})
    committed = time.monotonic()
    _, at = await arrival(stream, f"{mark}-sql", timeout=5)
    return api, at - committed


async def test_a_transaction_held_open_delays_nobody(server: Server, database_url: str) -> None:
    hub = AdminClient(server)
    hub.channel("busy")
    stream = hub.open("/channels/busy/stream")
    held, conn = await connect(database_url), await connect(database_url)
    before: list[tuple[float, float]] = []
    during: list[tuple[float, float]] = []
    try:
        for i in range(40):
            before.append(await _round(hub, stream, conn, f"before{i}"))
        tr = held.transaction()
        await tr.start()
        for i in range(3):
            await enqueue(held, "busy", {"u": f"held{i}"})
        hold_until = time.monotonic() + 10
        i = 0
        while time.monotonic() < hold_until:
            during.append(await _round(hub, stream, conn, f"during{i}"))
            i += 1
        assert not any(mark.startswith("held") for mark in stream.marks)
        last_during = max(stream.ids())
        # Taken before: the stream's reader may stamp an arrival before this
        # coroutine resumes from the commit (nothing arrived while held, above).
        committed = time.monotonic()
        await tr.commit()
        held_at = [await arrival(stream, f"held{i}") for i in range(3)]
        await inbox_drained(database_url)
    finally:
        await held.close()
        await conn.close()
    # Its events come after it commits, after everything published meanwhile,
    # adjacent and in call order.
    held_ids = [event_id for event_id, _ in held_at]
    assert held_ids == list(range(held_ids[0], held_ids[0] + 3))
    assert held_ids[0] > last_during
    assert all(at >= committed for _, at in held_at)
    history = [e["id"] for e in hub.history("busy")]
    assert stream.ids() == history  # gap-free, in order, once
    assert len(history) == 2 * (len(before) + len(during)) + 3
    api_before, sql_before = (p99([r[k] for r in before]) for k in (0, 1))
    api_during, sql_during = (p99([r[k] for r in during]) for k in (0, 1))
    print(
        f"\nheld transaction: {len(during)} rounds; p99 API publish->stream "
        f"{ms(api_before)} before, {ms(api_during)} during; "
        f"enqueue commit->stream {ms(sql_before)} before, {ms(sql_during)} during"
    )
    assert api_during < 1.0 and sql_during < 1.0


async def test_committed_enqueues_reach_an_open_stream_quickly(
    server: Server, database_url: str
) -> None:
    """The contract says 100 ms at p99; on a shared CI machine only a generous
    bound is asserted, the measure is printed."""
    hub = AdminClient(server)
    hub.channel("fast")
    stream = hub.open("/channels/fast/stream")
    conn = await connect(database_url)
    latencies: list[float] = []
    try:
        for i in range(100):
            async with conn.transaction():
                await enqueue(conn, "fast", {"u": f"e{i}"})
            committed = time.monotonic()
            _, at = await arrival(stream, f"e{i}", timeout=5)
            latencies.append(at - committed)
    finally:
        await conn.close()
    latencies.sort()
    print(f"\nenqueue commit->stream: p50 {ms(latencies[49])}, p99 {ms(p99(latencies))}")
    assert p99(latencies) < 0.5


# -- the movers' wake-up: polling while busy, a notification while asleep ---------------

_FLAG = "SELECT last_value FROM ssehub_inbox_asleep"  # 1: the movers may be asleep
_WRITERS = (
    f"FROM pg_stat_activity WHERE application_name = '{WRITER_NAME}' "
    "AND datname = current_database()"
)
# The flag set, and every writer idle after a move begun after $1.
_SET_SINCE = (
    f"SELECT ({_FLAG}) = 1 AND bool_and(state = 'idle' AND query_start > $1 "
    f"AND query LIKE '%ssehub_move_inbox%') {_WRITERS}"
)
# The flag set, and no writer has begun a statement for $1 seconds.
_SET_AND_QUIET = (
    f"SELECT ({_FLAG}) = 1 AND bool_and(state = 'idle' "
    f"AND clock_timestamp() - query_start > make_interval(secs => $1)) {_WRITERS}"
)


async def _flag(database_url: str) -> int:
    return int((await sql(database_url, _FLAG))[0][0])


async def _settled_again(database_url: str) -> None:
    """Wait until the mover, which has moved everything committed by now, has
    settled again: it set the flag after its next poll.

    Whatever moved the last rows, the next move after one that took rows is
    awake and clears the flag; so a flag set once the writer has finished a move
    begun after now was set by a settle since. (A move, not any statement: the
    writer may vacuum the inbox between the two. One instance: of two, one may
    still be awake when the other settles.)"""
    since = (await sql(database_url, "SELECT clock_timestamp()"))[0][0]

    async def settled() -> bool:
        return bool((await sql(database_url, _SET_SINCE, since))[0][0])

    await eventually(settled, "the mover to settle again")


async def _asleep(database_url: str) -> bool:
    """Every mover asleep: the flag set and no writer polling. Awake, a mover
    polls every few milliseconds; settling, at least every ``SETTLE_MAX_SECONDS``;
    asleep, only when woken."""
    rows = await sql(database_url, _SET_AND_QUIET, 4 * SETTLE_MAX_SECONDS)
    return bool(rows[0][0])


async def _committed_to_stream(
    conn: asyncpg.Connection, stream: TimedStream, mark: str
) -> tuple[int, float]:
    """Enqueue ``mark`` in a transaction of its own: its id, and commit -> stream."""
    async with conn.transaction():
        await enqueue(conn, "quiet", {"u": mark})
    committed = time.monotonic()
    event_id, at = await arrival(stream, mark, timeout=5)
    return event_id, at - committed


async def test_an_enqueue_held_open_while_the_movers_fall_asleep_delays_nobody_and_is_moved(
    server: Server, database_url: str
) -> None:
    """A transaction enqueues while the movers are awake (so it will not notify),
    then stays open while they find the inbox empty and set the flag (so the
    enqueues after it notify). Those reach the stream at once; and once it
    commits, its event follows at once too, not at the next safety-net wake-up
    seconds later: the movers went on polling until it ended."""
    hub = AdminClient(server)
    hub.channel("quiet")
    stream = hub.open("/channels/quiet/stream")
    held, conn, busy = [await connect(database_url) for _ in range(3)]
    others: list[float] = []
    held_latencies: list[float] = []

    async def keep_busy(round_: int, until: asyncio.Event) -> None:
        """Enqueues every few milliseconds: the movers stay awake, the flag clear."""
        i = 0
        while not until.is_set():
            async with busy.transaction():
                await enqueue(busy, "quiet", {"u": f"busy{round_}.{i}"})
            i += 1
            await asyncio.sleep(0.003)

    async def flag_clear() -> bool:
        return await _flag(database_url) == 0

    try:
        for round_ in range(3):
            enqueued = asyncio.Event()
            busy_task = asyncio.create_task(keep_busy(round_, enqueued))
            await arrival(stream, f"busy{round_}.0")
            await eventually(flag_clear, "the movers awake")
            tr = held.transaction()
            await tr.start()
            await enqueue(held, "quiet", {"u": f"held{round_}"})
            assert await _flag(database_url) == 0  # it read the flag clear: it will not notify
            enqueued.set()
            await busy_task
            await inbox_drained(database_url)
            await _settled_again(database_url)  # the movers found nothing to move
            last = 0
            for i in range(10):
                last, latency = await _committed_to_stream(conn, stream, f"other{round_}.{i}")
                others.append(latency)
                # Nothing to move again but the held transaction: the next one notifies.
                await _settled_again(database_url)
            await tr.commit()
            committed = time.monotonic()
            event_id, at = await arrival(stream, f"held{round_}", timeout=5)
            held_latencies.append(at - committed)
            assert event_id > last  # published after everything committed before it
        await inbox_drained(database_url)
    finally:
        for c in (held, conn, busy):
            await c.close()
    assert stream.ids() == [e["id"] for e in hub.history("quiet")]  # once each, in order
    print(
        f"\nwhile held: enqueue commit->stream p99 {ms(p99(others))}; "
        f"held ones after commit: {', '.join(ms(v) for v in held_latencies)}"
    )
    # A lost wake-up would wait for the listener's quiet turn (2 s).
    assert p99(others) < 0.5 and max(held_latencies) < 0.5


async def test_bursts_on_two_instances_arrive_complete_and_in_order(
    start_server, database_url: str
) -> None:
    """Bursts of enqueueing transactions from 8 connections, with pauses in which
    both instances' movers fall asleep: every committed event is published once,
    each transaction's adjacent and in call order, and a stream on each instance
    gets exactly the history, in order."""
    a, b = (start_server(SSEHUB_DB_POOL_SIZE="4") for _ in range(2))
    hub = AdminClient(a)
    hub.channel("burst")
    on_a = hub.open("/channels/burst/stream")
    on_b = hub.open("/channels/burst/stream", base=b.url)
    committed: dict[str, tuple[str, int]] = {}  # mark -> (transaction, index in it)

    async def burst(n: int, round_: int) -> None:
        rng = random.Random(n * 100 + round_)
        conn = await connect(database_url)
        try:
            for t in range(25):
                tx = f"r{round_}.c{n}.t{t}"
                marks = [f"{tx}.{i}" for i in range(rng.randint(1, 3))]
                async with conn.transaction():
                    for mark in marks:
                        await enqueue(conn, "burst", {"u": mark})
                committed.update((mark, (tx, i)) for i, mark in enumerate(marks))
        finally:
            await conn.close()

    for round_ in range(4):
        await asyncio.gather(*(burst(n, round_) for n in range(8)))
        # Between bursts the movers fall asleep: each burst wakes them.
        await eventually(lambda: _asleep(database_url), f"the movers asleep after burst {round_}")
    await inbox_drained(database_url)

    history = hub.history("burst")
    marks = [e["data"]["u"] for e in history]
    assert sorted(marks) == sorted(committed)  # every one, once
    by_mark = {e["data"]["u"]: e["id"] for e in history}
    transactions: dict[str, list[tuple[int, int]]] = {}
    for mark, (tx, i) in committed.items():
        transactions.setdefault(tx, []).append((i, by_mark[mark]))
    for tx, rows in transactions.items():
        ids = [event_id for _, event_id in sorted(rows)]
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"{tx} not adjacent: {ids}"
    expected = [e["id"] for e in history]
    assert on_a.wait_ids(len(expected), timeout=20) == expected
    assert on_b.wait_ids(len(expected), timeout=20) == expected
    on_a.close()
    on_b.close()


# -- concurrency, and an instance killed in the middle ----------------------------------


async def test_concurrent_enqueues_and_publishes_on_two_instances_survive_a_sigkill(
    start_server, database_url: str
) -> None:
    # Small pools: the test's Postgres is shared, and 8 more connections are the application's.
    a, b = (start_server(SSEHUB_DB_POOL_SIZE="4") for _ in range(2))
    hub = AdminClient(b)
    channels = ["left", "right"]
    for name in channels:
        hub.channel(name)
    on_b = {c: hub.open(f"/channels/{c}/stream") for c in channels}
    on_a = hub.open("/channels/left/stream", base=a.url)
    committed: dict[str, tuple[str, int]] = {}  # mark -> (transaction, index in it)
    rolled_back: set[str] = set()
    published: dict[str, int] = {}  # API mark -> event id
    done = 0
    killed = asyncio.Event()
    enqueuers_done = asyncio.Event()

    async def enqueuer(n: int) -> None:
        nonlocal done
        rng = random.Random(n)
        conn = await connect(database_url)
        try:
            for t in range(100):
                tx = f"t{n}.{t}"
                rows = [(rng.choice(channels), f"{tx}.{i}") for i in range(rng.randint(1, 3))]
                tr = conn.transaction()
                await tr.start()
                for i, (channel, mark) in enumerate(rows):
                    await enqueue(conn, channel, {"u": mark, "tx": tx, "i": i})
                if rng.random() < 0.1:
                    await tr.rollback()
                    rolled_back.update(mark for _, mark in rows)
                else:
                    await tr.commit()
                    committed.update((mark, (tx, i)) for i, (_, mark) in enumerate(rows))
                done += 1
                await asyncio.sleep(rng.uniform(0, 0.02))
        finally:
            await conn.close()

    async def publisher(n: int) -> None:
        """API publishes on both instances; one that fails (its instance was
        killed) is retried on the other with the same Idempotency-Key."""
        rng = random.Random(100 + n)
        async with httpx.AsyncClient(headers=hub.admin, timeout=10) as client:
            i = 0
            while not enqueuers_done.is_set():
                mark = f"p{n}.{i}"
                i += 1
                channel = rng.choice(channels)
                bases = [b.url] if killed.is_set() else rng.sample([a.url, b.url], 2)
                for base in [*bases, b.url, b.url]:
                    try:
                        r = await client.post(
                            f"{base}/channels/{channel}/events",
                            json={"data": {"u": mark}},
                            headers={"Idempotency-Key": mark},
                        )
                    except httpx.TransportError:
                        continue
                    if r.status_code in (200, 201):
                        published[mark] = r.json()["id"]
                        break
                    assert r.status_code == 503, r.text
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"{mark} was never published")

    async def killer() -> None:
        while done < 240:  # 30% of the 800 transactions
            await asyncio.sleep(0.005)
        assert a.process is not None
        a.process.kill()  # SIGKILL: no shutdown, its transactions die with it
        a.process.wait()
        killed.set()

    started = time.monotonic()
    publishers = [asyncio.create_task(publisher(n)) for n in range(2)]
    kill = asyncio.create_task(killer())
    await asyncio.gather(*(enqueuer(n) for n in range(8)))
    enqueuers_done.set()
    await asyncio.gather(*publishers, kill)
    await inbox_drained(database_url, timeout=20)
    took = time.monotonic() - started

    history = {c: hub.history(c) for c in channels}
    marks = [e["data"]["u"] for c in channels for e in history[c]]
    assert len(marks) == len(set(marks)), "an event was published twice"
    assert {m for m in marks if m.startswith("t")} == set(committed), "enqueues lost or leaked"
    assert not rolled_back & set(marks)
    by_mark = {e["data"]["u"]: e for c in channels for e in history[c]}
    assert {m: by_mark[m]["id"] for m in marks if m.startswith("p")} == published
    # Each transaction's events: adjacent ids (across channels), in call order.
    transactions: dict[str, list[tuple[int, int]]] = {}
    for mark, (tx, i) in committed.items():
        transactions.setdefault(tx, []).append((i, by_mark[mark]["id"]))
    for tx, rows in transactions.items():
        ids = [event_id for _, event_id in sorted(rows)]
        assert ids == list(range(ids[0], ids[0] + len(ids))), f"{tx} not adjacent: {ids}"
    # Streams agree with the history exactly; the one on the killed instance
    # resumes on the other from its last id.
    for c in channels:
        expected = [e["id"] for e in history[c]]
        assert on_b[c].wait_ids(len(expected), timeout=20) == expected
    assert on_a.ended
    seen = on_a.ids()
    resumed = hub.open(
        "/channels/left/stream", headers={"Last-Event-ID": str(seen[-1])} if seen else {}
    )
    left = [e["id"] for e in history["left"]]
    assert seen + resumed.wait_ids(len(left) - len(seen), timeout=20) == left
    for s in [*on_b.values(), on_a, resumed]:
        s.close()
    print(
        f"\n{len(transactions)} transactions committed ({len(committed)} enqueues), "
        f"{len(rolled_back)} enqueues rolled back, {len(published)} API publishes, "
        f"instance killed after 240 transactions; {took:.1f} s"
    )


# -- a backfill, a transaction that cannot move, instances with other limits -----------

BACKFILL_ROWS = 20_000  # one statement moving them all held the publish lock for seconds
_BACKFILL = (
    "SELECT count(ssehub_enqueue('bulk', 'message', jsonb_build_object('u', 'b' || g))) "
    "FROM generate_series(1, $1) AS g"
)


async def _writer_statements(database_url: str, older_than: float) -> list[Any]:
    """The writer's statements running for longer than ``older_than`` seconds."""
    return await sql(
        database_url,
        "SELECT pid, state, wait_event_type, query FROM pg_stat_activity "
        "WHERE application_name = 'ssehub-writer' AND datname = current_database() "
        "AND state <> 'idle' AND clock_timestamp() - query_start > make_interval(secs => $1)",
        older_than,
    )


async def test_attack_backfill_transaction_stalls_no_publisher(
    server: Server, database_url: str
) -> None:
    """One transaction enqueues 20,000 events. Every event reaches the log and the
    stream exactly once and in call order, adjacent in runs of ``MOVE_ROWS``,
    while API publishes keep answering within 2 s; afterwards no statement of the
    writer is left running."""
    hub = AdminClient(server)
    hub.channel("bulk")
    hub.channel("live")
    stream = hub.open("/channels/bulk/stream")
    conn = await connect(database_url)
    latencies: list[float] = []
    during = 0
    try:
        async with conn.transaction():
            assert await conn.fetchval(_BACKFILL, BACKFILL_ROWS) == BACKFILL_ROWS
        async with conn.transaction():  # committed after it: published after all of it
            await enqueue(conn, "bulk", {"u": "after"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            waiting = (await sql(database_url, "SELECT count(*) FROM ssehub_inbox"))[0][0]
            if waiting == 0:
                break
            started = time.monotonic()
            r = await asyncio.to_thread(hub.publish, "live", {"u": f"p{len(latencies)}"})
            latencies.append(time.monotonic() - started)
            assert r.status_code == 201, r.text
            during += 1
        await inbox_drained(database_url, timeout=5)
    finally:
        await conn.close()
    print(
        f"\nbackfill of {BACKFILL_ROWS}: {during} API publishes meanwhile, "
        f"slowest {ms(max(latencies))}, p99 {ms(p99(latencies))}"
    )
    assert max(latencies) < 2.0
    assert during >= 5, "the backfill moved before any publish could be timed"
    history = hub.history("bulk")
    assert [e["data"]["u"] for e in history] == [
        *(f"b{g}" for g in range(1, BACKFILL_ROWS + 1)),
        "after",
    ]
    ids = [e["id"] for e in history]
    for start in range(0, BACKFILL_ROWS, MOVE_ROWS):
        run = ids[start : start + MOVE_ROWS]
        assert run == list(range(run[0], run[0] + len(run))), f"rows {start}.. not adjacent"
    assert stream.wait_ids(len(ids), timeout=60) == ids
    assert await _writer_statements(database_url, 1.0) == []


async def test_attack_poisoned_transaction_is_set_aside_not_retried_ahead_forever(
    server: Server, database_url: str
) -> None:
    """A transaction whose events the log refuses (here a trigger refuses one of
    them) is set aside: a transaction committed after it is published meanwhile;
    once the log accepts it, it is published too, whole and in order."""
    hub = AdminClient(server)
    hub.channel("orders")
    poison = (
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$",
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW "
        "WHEN (NEW.data LIKE '%poison%') EXECUTE FUNCTION refuse_poison()",
    )
    cure = (
        "DROP TRIGGER IF EXISTS refuse_poison ON events",
        "DROP FUNCTION IF EXISTS refuse_poison()",
    )
    for statement in poison:
        await sql(database_url, statement)
    conn = await connect(database_url)
    try:
        async with conn.transaction():
            await enqueue(conn, "orders", {"u": "t1-a"})
            await enqueue(conn, "orders", {"u": "poison"})
        async with conn.transaction():
            await enqueue(conn, "orders", {"u": "t2"})

        async def marks() -> list[str]:
            rows = await sql(
                database_url,
                "SELECT e.data FROM events e JOIN channels c ON c.id = e.channel_id "
                "WHERE c.name = 'orders' ORDER BY e.id",
            )
            return [json.loads(row[0])["u"] for row in rows]

        async def only_t2() -> bool:
            return await marks() == ["t2"]

        await eventually(only_t2, "t2 published, not waiting behind the poisoned one", 15)
        stalled = await sql(database_url, "SELECT error FROM ssehub_inbox_stalled")
        assert [row[0] for row in stalled] == ["refused by a trigger"]
        for statement in cure:
            await sql(database_url, statement)
        await inbox_drained(database_url, timeout=60)
    finally:
        await conn.close()
        for statement in cure:
            await sql(database_url, statement)
    history = hub.history("orders")
    assert [e["data"]["u"] for e in history] == ["t2", "t1-a", "poison"]
    assert history[2]["id"] == history[1]["id"] + 1
    assert await sql(database_url, "SELECT * FROM ssehub_inbox_stalled") == []


async def _enqueue_refused(conn: asyncpg.Connection, size: int) -> str | None:
    """The error of enqueueing data of ``size`` bytes of compact JSON, or None."""
    try:
        async with conn.transaction():
            await enqueue(conn, "sized", "x" * (size - 2))
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == "22023", exc
        return str(exc)
    return None


async def test_instances_with_different_limits_enqueue_takes_the_smallest_whichever_started_last(
    start_server, database_url: str
) -> None:
    """Each instance declares its SSEHUB_MAX_EVENT_BYTES; ``ssehub_enqueue`` takes
    the smallest of those running, not the last one started's."""
    small = start_server(SSEHUB_MAX_EVENT_BYTES="100")
    large = start_server(SSEHUB_MAX_EVENT_BYTES="200")  # started last
    hub = AdminClient(large)
    hub.channel("sized")
    conn = await connect(database_url)
    try:
        assert await _enqueue_refused(conn, 100) is None
        refused = await _enqueue_refused(conn, 101)
        assert refused and "the limit is 100" in refused
        small.stop()  # withdrawn as it stops
        assert await _enqueue_refused(conn, 200) is None
        assert "the limit is 200" in (await _enqueue_refused(conn, 201) or "")
        start_server(SSEHUB_MAX_EVENT_BYTES="150")
        assert "the limit is 150" in (await _enqueue_refused(conn, 151) or "")
        await inbox_drained(database_url)
    finally:
        await conn.close()
    assert [len(json.dumps(e["data"])) for e in hub.history("sized")] == [100, 200]


# -- grant-publisher --------------------------------------------------------------------


async def test_grant_publisher_grants_enqueue_and_nothing_else(
    server: Server, database_url: str
) -> None:
    hub = AdminClient(server)
    hub.channel("orders")
    role = f"ssehub_pub_{uuid.uuid4().hex[:8]}"
    await sql(database_url, f"CREATE ROLE {role} LOGIN")
    try:
        app = await asyncpg.connect(asyncpg_dsn(as_role(database_url, role)))
        try:
            assert await app.fetchval("SELECT current_user") == role
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await enqueue(app, "orders", {"u": "too-early"})

            done = run_cli("grant-publisher", role, database_url=database_url)
            assert done.returncode == 0, done.stderr
            assert role in done.stdout

            async with app.transaction():
                await enqueue(app, "orders", {"u": "granted"}, "order.paid")
            await inbox_drained(database_url)
            assert [e["data"] for e in hub.history("orders")] == [{"u": "granted"}]

            tables = [
                r[0]
                for r in await sql(
                    database_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            ]
            assert {"events", "users", "channels", "ssehub_inbox", "api_keys"} <= set(tables)
            assert {"idempotency_keys", "ssehub_inbox_stalled", "ssehub_instance_limits"} <= set(
                tables
            )
            for table in tables:
                column = await sql(
                    database_url,
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = $1 AND is_identity = 'NO' AND is_generated = 'NEVER' "
                    "ORDER BY ordinal_position LIMIT 1",
                    table,
                )
                col = column[0][0]
                for statement in (
                    f"SELECT * FROM {table} LIMIT 1",
                    f"INSERT INTO {table} DEFAULT VALUES",
                    f"UPDATE {table} SET {col} = {col}",
                    f"DELETE FROM {table}",
                    f"TRUNCATE {table}",
                ):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await app.execute(statement)
            for call in (
                "SELECT ssehub_move_inbox(1000, 1000, true, NULL)",
                "SELECT ssehub_inbox_sleep()",
                "SELECT setval('ssehub_inbox_asleep', 0)",  # enqueues would wake nobody
                "SELECT * FROM ssehub_publish_as(ARRAY[1]::bigint[], ARRAY[NULL]::bigint[], "
                "ARRAY['orders'], ARRAY['message'], ARRAY['1'], ARRAY[NULL], ARRAY[1], 1000)",
                "SELECT * FROM ssehub_append(ARRAY[1]::bigint[], ARRAY['message'], "
                "ARRAY['1'], ARRAY[NULL], ARRAY[1])",
                "SELECT ssehub_publish_lock(1000)",
                "SELECT nextval(pg_get_serial_sequence('events', 'id'))",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await app.execute(call)
        finally:
            await app.close()
        assert [e["data"] for e in hub.history("orders")] == [{"u": "granted"}]

        unknown = run_cli("grant-publisher", f"{role}_missing", database_url=database_url)
        assert unknown.returncode != 0
        assert f"no database role '{role}_missing'" in unknown.stderr
        assert "Traceback" not in unknown.stderr
    finally:
        await sql(database_url, f"DROP OWNED BY {role}")
        await sql(database_url, f"DROP ROLE {role}")
