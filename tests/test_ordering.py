"""The ordering guarantee: ids become visible in increasing order, on every instance.

Publishers on two server processes (so two writers, two connections pools)
mix single events and batches while a reader keeps asking for "everything
after the last id I saw". With a plain identity column this loses events: a
transaction holding a smaller id commits after a larger one was read. The
reader must end with every published id, once each, in increasing order.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import asyncpg
import httpx

from app.db import asyncpg_dsn
from app.events.publisher import (
    CANCEL_WAIT_SECONDS,
    LOCK_WAIT_SECONDS,
    PUBLISH_LOCK,
    WRITE_TIMEOUT_SECONDS,
    WRITER_NAME,
)
from tests.support import Api, Server, eventually, sql

PUBLISHERS = 12
SECONDS = 3.0
_WAITING_FOR = (  # the writer's statements that wait for a lock backend $2 holds
    "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
    "AND datname = current_database() AND $2 = ANY(pg_blocking_pids(pid))"
)


def test_reader_polling_after_last_seen_misses_nothing(start_server) -> None:
    servers: list[Server] = [start_server(), start_server()]
    admin = Api(servers[0].url).admin()
    httpx.post(f"{servers[0].url}/channels", json={"name": "ordered"}, headers=admin)
    published: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def publish(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=servers[seed % 2].url, headers=admin, timeout=30) as client:
            while not stop.is_set():
                if rng.random() < 0.3:
                    events = [{"data": i} for i in range(rng.randint(2, 20))]
                    r = client.post("/channels/ordered/events/batch", json={"events": events})
                    ids = [e["id"] for e in r.json()["events"]]
                else:
                    r = client.post("/channels/ordered/events", json={"data": seed})
                    ids = [r.json()["id"]]
                assert r.status_code == 201
                with lock:
                    published.extend(ids)

    seen: list[int] = []

    def read() -> None:
        with httpx.Client(base_url=servers[1].url, headers=admin, timeout=30) as client:
            after = 0
            while True:
                page = client.get(f"/channels/ordered/events?after={after}&limit=1000").json()
                ids = [e["id"] for e in page["events"]]
                seen.extend(ids)
                if ids:
                    after = ids[-1]
                elif stop.is_set() and drained.is_set():
                    return

    drained = threading.Event()
    reader = threading.Thread(target=read)
    reader.start()
    publishers = [threading.Thread(target=publish, args=(i,)) for i in range(PUBLISHERS)]
    for t in publishers:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in publishers:
        t.join()
    drained.set()
    reader.join(30)
    assert len(published) > 200, "too little concurrency to mean anything"
    assert seen == sorted(set(seen)), "an id was seen twice or out of order"
    missing = sorted(set(published) - set(seen))
    assert not missing, (
        f"{len(missing)} of {len(published)} events lost behind the cursor: {missing[:10]}"
    )


def test_a_publish_waits_for_the_ordering_lock(server: Server, database_url: str) -> None:
    """The guarantee rests on every publish taking ``PUBLISH_LOCK`` before it
    draws ids. The test above no longer catches the lock's absence (the one-
    statement publish leaves too narrow a window), so check its presence: while
    another transaction holds the lock, a publish must neither finish nor draw
    an id; once it is released, the publish completes with the next id."""
    admin = Api(server.url).admin()
    assert httpx.post(f"{server.url}/channels", json={"name": "locked"}, headers=admin).is_success
    first = httpx.post(f"{server.url}/channels/locked/events", json={"data": 1}, headers=admin)
    answers: list[httpx.Response] = []

    async def hold_lock_while_publishing() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        holder = conn.get_server_pid()

        async def waiting_or_answered() -> bool:
            """The writer waits for our lock (or, without it, has answered)."""
            return bool(await sql(database_url, _WAITING_FOR, WRITER_NAME, holder)) or bool(answers)

        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PUBLISH_LOCK)
                publisher = threading.Thread(
                    target=lambda: answers.append(
                        httpx.post(
                            f"{server.url}/channels/locked/events",
                            json={"data": 2},
                            headers=admin,
                            timeout=30,
                        )
                    )
                )
                publisher.start()
                await eventually(waiting_or_answered, "the publish to wait for the lock")
                assert not answers, "the publish finished while the ordering lock was held"
                drawn = await conn.fetchval(
                    "SELECT pg_sequence_last_value(pg_get_serial_sequence('events', 'id')::regclass)"
                )
                assert drawn == first.json()["id"], "ids were drawn before the lock was taken"
            await asyncio.to_thread(publisher.join, 30)
        finally:
            await conn.close()

    asyncio.run(hold_lock_while_publishing())
    assert [r.status_code for r in answers] == [201]
    assert answers[0].json()["id"] > first.json()["id"]


async def _writer_busy(database_url: str) -> list[asyncpg.Record]:
    """The writer's statements that have not ended, as the server sees them."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT pid, state, wait_event_type, query FROM pg_stat_activity "
            "WHERE application_name = 'ssehub-writer' AND datname = current_database() "
            "AND state <> 'idle'"
        )
        return rows
    finally:
        await conn.close()


async def _writer_idle(database_url: str, within: float, what: str) -> None:
    """Wait until no statement of the writer runs, failing with ``what`` and the
    statements left after ``within`` seconds."""
    left: list[asyncpg.Record] = []

    async def idle() -> bool:
        left[:] = await _writer_busy(database_url)
        return not left

    await eventually(idle, lambda: f"{what}: {left}", within)


def test_attack_writer_timeout_leaves_no_statement_running(
    server: Server, database_url: str
) -> None:
    """A publish's statement that cannot finish (its channel's row locked by
    another transaction) outlasts the writer's wait: the request answers 503,
    and the server statement is cancelled then, not left waiting to publish
    behind the writer's back once the lock goes."""
    admin = Api(server.url).admin()
    assert httpx.post(f"{server.url}/channels", json={"name": "held"}, headers=admin).is_success
    answers: list[httpx.Response] = []

    async def hold_the_channel_row() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM channels WHERE name = 'held' FOR UPDATE")
                publish = threading.Thread(
                    target=lambda: answers.append(
                        httpx.post(
                            f"{server.url}/channels/held/events",
                            json={"data": "given up"},
                            headers=admin,
                            timeout=60,
                        )
                    )
                )
                publish.start()
                await asyncio.to_thread(publish.join, 60)
                assert [r.status_code for r in answers] == [503]
                # Still holding the row: the given-up statement must be gone already.
                await _writer_idle(
                    database_url, CANCEL_WAIT_SECONDS, "the writer's statement to be cancelled"
                )
        finally:
            await conn.close()

    asyncio.run(hold_the_channel_row())
    after = httpx.post(f"{server.url}/channels/held/events", json={"data": "next"}, headers=admin)
    assert after.status_code == 201, after.text
    history = httpx.get(f"{server.url}/channels/held/events", headers=admin).json()["events"]
    assert [e["data"] for e in history] == ["next"]


def test_attack_held_publish_lock_answers_503_within_the_wait(
    server: Server, database_url: str
) -> None:
    """Any role may take any advisory lock. One holding the publish lock makes
    publishes answer 503 once ``LOCK_WAIT_SECONDS`` have passed, with no
    statement left waiting for it; once it is let go, publishing goes on."""
    admin = Api(server.url).admin()
    assert httpx.post(f"{server.url}/channels", json={"name": "locked"}, headers=admin).is_success

    async def hold_the_lock() -> float:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", PUBLISH_LOCK)
            started = time.monotonic()
            r = await asyncio.to_thread(
                httpx.post,
                f"{server.url}/channels/locked/events",
                json={"data": "refused"},
                headers=admin,
                timeout=60,
            )
            took = time.monotonic() - started
            assert r.status_code == 503, r.text
            await _writer_idle(database_url, 2, "no statement of the writer to wait")
            return took
        finally:
            await conn.close()  # lets the lock go

    took = asyncio.run(hold_the_lock())
    assert LOCK_WAIT_SECONDS - 0.5 < took < WRITE_TIMEOUT_SECONDS, took
    r = httpx.post(f"{server.url}/channels/locked/events", json={"data": "goes"}, headers=admin)
    assert r.status_code == 201, r.text
    history = httpx.get(f"{server.url}/channels/locked/events", headers=admin).json()["events"]
    assert [e["data"] for e in history] == ["goes"]
