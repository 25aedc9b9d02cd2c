"""Publishing from SQL: ``ssehub_enqueue`` against Postgres's own INSERT, in one run.

    python -m bench --only enqueue     # about a minute and a half on 2 cores

One ssehub instance (pinned to CPU 0, as every target) moves the inbox while
pgbench (on CPU 1, ``bench.pgbench``) commits one event per transaction from
``CLIENTS`` clients:

- ``plain``: a single-row INSERT into a table shaped like ``events`` (in
  pgbench's scratch database): the commit rate Postgres itself reaches;
- ``notify``: the same INSERT and a ``pg_notify`` in one transaction: what a
  NOTIFY on every commit costs;
- ``enqueue``: ``SELECT ssehub_enqueue('bench', 'message', '{"i":1}')`` in
  ssehub's database, with the instance moving the inbox meanwhile; then the
  rows left in the inbox when the load stopped, and how long the instance took
  to drain them.

The three alternate, ``reps`` times each, so a ratio compares figures taken
seconds apart. Then commit → stream latency, at ``FIXED_RATE`` enqueues/s and
at 80% of the enqueue rate just measured: ``CLIENTS`` asyncpg connections
take the enqueues as they fall due (one transaction each; "achieved" is the
rate they kept up), the time each commit returned is noted, and one SSE stream
on the channel notes when each event arrived.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from app.events.publisher import WRITER_NAME
from bench import pgbench
from bench.cost import Meter, cpu_seconds, wait_seconds
from bench.loadgen import StreamProtocol, Totals, close_streams, get_request
from bench.scenarios import percentile
from bench.targets import HOST, Ssehub, admin_sql, database_url, start_ssehub

CLIENTS = 16
CHANNEL = "bench"
FIXED_RATE = 500.0
LOAD_SHARE = 0.8  # of the measured enqueue rate, for the second latency run
DRAIN_LIMIT_SECONDS = 60.0
SAMPLE_SECONDS = 0.005  # the mover's profile: pg_stat_activity sampled this often
_MOVER = (  # the instance's mover: its writer's backend
    f"FROM pg_stat_activity WHERE application_name = '{WRITER_NAME}' "
    "AND datname = current_database()"
)

NOTIFY = f"""\
BEGIN;
{pgbench.SINGLE}SELECT pg_notify('ssehub_bench', '');
END;
"""
ENQUEUE = f"""\
SELECT ssehub_enqueue('{CHANNEL}', 'message', '{{"i":1}}');
"""
SCRIPTS = {"plain": pgbench.SINGLE, "notify": NOTIFY, "enqueue": ENQUEUE}
_ENQUEUE_MARKED = f"SELECT ssehub_enqueue('{CHANNEL}', 'message', $1::jsonb)"
_MARK = re.compile(rb'"n":([0-9]+)')


class MarkedStream(StreamProtocol):
    """A stream that notes when each event marked ``"n"`` arrived."""

    arrived: dict[int, float]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        for match in _MARK.finditer(data):
            self.arrived.setdefault(int(match.group(1)), now)
        super().data_received(data)


def run(seconds: float, reps: int) -> dict[str, Any]:
    """Throughput legs, drain, then the two latency runs; one fresh instance."""
    scratch = f"ssehub_pgbench_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin_sql(f'CREATE DATABASE "{scratch}"'))
    target = start_ssehub([CHANNEL])
    try:
        asyncio.run(pgbench.create_table(scratch))
        results = _throughput(target, scratch, seconds, reps)
        rate = LOAD_SHARE * statistics.median(r["per_s"] for r in results["enqueue"])
        results["latency"] = [
            asyncio.run(_latency(target, FIXED_RATE, seconds)),
            asyncio.run(_latency(target, rate, seconds)),
        ]
        return results
    finally:
        target.stop()
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))


class MoverProfile:
    """What the instance's mover (its writer's Postgres backend) did
    from ``start()`` to ``stop()``: the events it appended, that backend's CPU
    and the time it waited for a core (``/proc``), and where it was when
    sampled (``pg_stat_activity`` every ``SAMPLE_SECONDS``, from a thread of
    its own): running (on a core or waiting for one), waiting for ssehub's next
    statement (``ClientRead``: the mover polling or the server busy), or a
    named wait (a lock, I/O, the WAL)."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._stop = threading.Event()
        self._states: Counter[str] = Counter()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._sample()))

    def start(self) -> MoverProfile:
        self._pids, self._head = asyncio.run(self._now())
        self._cpu, self._waited = cpu_seconds(self._pids), wait_seconds(self._pids)
        self._began = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self._began
        _, head = asyncio.run(self._now())
        moved = head - self._head
        cpu = cpu_seconds(self._pids) - self._cpu
        waited = wait_seconds(self._pids) - self._waited
        samples = max(1, sum(self._states.values()))
        return {
            "moved": moved,
            "moved_per_s": moved / wall,
            "cpu_pct": cpu * 100 / wall,
            "core_wait_pct": waited * 100 / wall,
            "cpu_us_per_row": cpu * 1e6 / moved if moved else float("nan"),
            "states": {k: v * 100 / samples for k, v in self._states.most_common()},
        }

    async def _now(self) -> tuple[list[int], int]:
        conn = await asyncpg.connect(database_url(self.database))
        try:
            pids = await conn.fetch(f"SELECT pid {_MOVER}")
            head = await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")
            return [row[0] for row in pids], int(head)
        finally:
            await conn.close()

    async def _sample(self) -> None:
        conn = await asyncpg.connect(database_url(self.database))
        query = f"SELECT state, wait_event_type, wait_event {_MOVER}"
        try:
            while not self._stop.is_set():
                for state, kind, event in await conn.fetch(query):
                    if event == "ClientRead":
                        self._states["waiting for ssehub"] += 1
                    elif state == "active" and kind is None:
                        self._states["running"] += 1
                    else:
                        self._states[f"{kind}: {event}" if kind else str(state)] += 1
                await asyncio.sleep(SAMPLE_SECONDS)
        finally:
            await conn.close()


def _throughput(target: Ssehub, scratch: str, seconds: float, reps: int) -> dict[str, Any]:
    results: dict[str, Any] = {leg: [] for leg in SCRIPTS}
    with tempfile.TemporaryDirectory(prefix="ssehub-enqueue-") as tmp:
        for _ in range(reps):
            for leg, sql in SCRIPTS.items():
                script = Path(tmp) / f"{leg}.sql"
                script.write_text(sql)
                database = target.database if leg == "enqueue" else scratch
                profile = MoverProfile(target.database).start() if leg == "enqueue" else None
                one = pgbench.run_script(database, script, CLIENTS, seconds)
                row: dict[str, Any] = {"per_s": one["tps"], "clients": CLIENTS, **one}
                if profile is not None:
                    row["mover_loaded"] = profile.stop()
                    drain = MoverProfile(target.database).start()
                    row.update(asyncio.run(_drain(target.database)))
                    row["mover_draining"] = drain.stop()
                results[leg].append(row)
    return results


async def _drain(database: str) -> dict[str, float]:
    """Rows left in the inbox as the load stopped, and seconds until none is."""
    conn = await asyncpg.connect(database_url(database))
    try:
        began = time.monotonic()
        backlog = await conn.fetchval("SELECT count(*) FROM ssehub_inbox")
        left = backlog
        while left and time.monotonic() - began < DRAIN_LIMIT_SECONDS:
            await asyncio.sleep(0.01)
            left = await conn.fetchval("SELECT count(*) FROM ssehub_inbox")
        return {"backlog": backlog, "drain_s": time.monotonic() - began, "left": left}
    finally:
        await conn.close()


async def _latency(target: Ssehub, rate: float, seconds: float) -> dict[str, Any]:
    """Enqueue at ``rate`` for ``seconds``; commit → stream per event."""
    loop = asyncio.get_running_loop()
    totals = Totals()
    arrived: dict[int, float] = {}
    path = target.stream_path(CHANNEL)

    def marked(*args: Any) -> MarkedStream:
        stream = MarkedStream(*args)
        stream.arrived = arrived
        return stream

    connected: asyncio.Future[bool] = loop.create_future()
    request = get_request(HOST, target.port, path)
    _, stream = await loop.create_connection(
        lambda: marked(request, totals, False, connected), HOST, target.port
    )
    await asyncio.wait_for(connected, 10)
    conns = [await asyncpg.connect(database_url(target.database)) for _ in range(CLIENTS)]
    due: asyncio.Queue[int] = asyncio.Queue()
    committed: dict[int, float] = {}

    async def enqueuer(conn: asyncpg.Connection) -> None:
        """One connection: the next due enqueue, one transaction each."""
        while (n := await due.get()) >= 0:
            await conn.execute(_ENQUEUE_MARKED, f'{{"n":{n},"t":0}}')
            committed[n] = time.monotonic()

    meter = Meter(target)
    try:
        workers = [asyncio.create_task(enqueuer(conn)) for conn in conns]
        began = time.monotonic()
        total = int(rate * seconds)
        for n in range(total):
            delay = began + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            due.put_nowait(n)
        for _ in workers:
            due.put_nowait(-1)
        await asyncio.gather(*workers)
        sent_for = time.monotonic() - began
        deadline = time.monotonic() + 10
        while len(arrived) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        cost = meter.read()
    finally:
        for conn in conns:
            await conn.close()
        close_streams([stream])
    latencies = [arrived[n] - committed[n] for n in committed if n in arrived]
    return {
        "rate": rate,
        "achieved": total / sent_for,
        "sent": total,
        "delivered": len(arrived),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        **cost,
    }
