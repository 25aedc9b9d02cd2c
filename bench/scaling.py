"""What k instances cost, and the per-unit figures docs/SCALING.md plans with (issue #13).

    python -m bench.scaling                  # every phase (about 10 minutes on 2 cores, plus waits)
    python -m bench.scaling --quick          # a smoke run with tiny numbers (bench/results/scaling-quick.json)
    python -m bench.scaling --only cluster   # one phase; the others' figures are kept

Phases, each on fresh servers and a fresh database:

- ``memory``: RSS growth per idle stream (``bench.scenarios.idle_memory``), and
  the kernel's memory per connection (slab and socket buffers, both ends on
  this machine, halved: an estimate).
- ``fanout``: one channel fanned out to N streams at two rates
  (``bench.scenarios.fan_out``): server CPU per delivery, deliveries per core.
- ``publish``: the one-writer ceiling, singles from 32 clients and batches of
  1,000 from 4 (``bench.scenarios.publish_throughput``), with Postgres's CPU.
- ``cluster``: for each broker (postgres, nats) and k in 1, 2, 4, 8 instances
  on one database: streams on every instance over every channel (``all``),
  then each channel carried by one instance only (``disjoint``, interest
  routing); paced single publishes spread over the instances. Per event
  published: Postgres work (``pg_stat_user_tables`` of ``events``,
  ``pg_stat_database``, the CPU of every postgres process), rows the
  instances read from the log (``ssehub_broker_events_total{source="log"}``),
  NATS messages and bytes (``/varz``), instances' and nats-server's CPU. An
  idle window before each run gives the fixed costs, subtracted in ``net``.
- ``personal``: two instances, publishes through one, the other carrying one
  stream per channel: what an event that reaches one stream costs the
  instance that receives it, with each broker.
- ``nats``: the local nats-server driven by nats-py, one publisher and one or
  four subscribers: messages/s through it and its CPU per message.
- ``interest``: issue #13's own scenario, for each broker: 4 instances, 100
  channels, each instance carrying streams of 10 of them (60 carried by
  none), 1,000 events/s published over all 100: rows read from Postgres per
  event (goal with NATS: at most 1.1) and p99 publish to delivery (goal: at
  most 50 ms).

Servers are pinned to CPU 0, this process to CPU 1 (as ``python -m bench``);
Postgres is unpinned, nats-server too except in ``nats``. Before each phase
the run waits until the machine is quiet (no other ``pytest`` or ``python -m
bench``, 1-minute load average below 0.7) and writes its pid to
``/tmp/ssehub-scaling.running`` while it runs. Each step records the CPU
that processes outside this run used meanwhile; a step during which another
benchmark or test ran, or others used more than a fifth of a core, is marked
``disturbed`` (``--only PHASE`` redoes a phase).

``python -m bench.scaling_model`` turns the results into the plan.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvloop

from bench import cost
from bench.loadgen import HttpClient, StreamProtocol, Totals, close_streams, open_streams
from bench.scenarios import fan_out, idle_memory, percentile, publish_throughput
from bench.targets import (
    HOST,
    PG,
    ROOT,
    Ssehub,
    Target,
    admin_sql,
    database_url,
    launch_ssehub,
    start_ssehub,
)

RESULTS = ROOT / "bench" / "results" / "scaling.json"
QUICK_RESULTS = ROOT / "bench" / "results" / "scaling-quick.json"
RUNNING = Path("/tmp/ssehub-scaling.running")
NATS_SERVER = os.environ.get("SSEHUB_BENCH_NATS_SERVER", "/usr/sbin/nats-server")
PHASES = ["memory", "fanout", "publish", "cluster", "personal", "nats", "interest"]
BROKERS = ["postgres", "nats"]
QUIET_LOAD = 0.7
OTHERS = "pytest|python -m bench"
# A step during which processes outside this run used more than this share of
# a core is marked disturbed.
FOREIGN_LIMIT = 0.2


@dataclass
class Plan:
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    streams_per_instance: int = 50
    channels: int = 10
    rate: float = 200  # events/s published, in total
    seconds: float = 10
    idle_seconds: float = 5
    memory_counts: list[int] = field(default_factory=lambda: [1000, 5000, 10000])
    fanout_n: int = 10000
    fanout_rates: list[float] = field(default_factory=lambda: [10, 100])
    fanout_seconds: float = 5
    reps: int = 2
    publish_seconds: float = 5
    # One rerun of k = high_rate_k at this rate (events/s): how reads coalesce.
    high_rate: float = 1000
    high_rate_k: int = 4
    personal_channels: int = 500
    personal_rates: list[float] = field(default_factory=lambda: [500, 2000])
    nats_messages: int = 200_000
    nats_size: int = 200  # bytes: about an event's message on ``ssehub.<ns>.ev.<id>``
    # Issue #13's scenario: k instances, each carrying streams of a few of many channels.
    interest_k: int = 4
    interest_channels: int = 100
    interest_carried: int = 10  # channels per instance
    interest_rate: float = 1000


QUICK = Plan(
    ks=[1, 2],
    streams_per_instance=10,
    channels=4,
    rate=50,
    seconds=2,
    idle_seconds=2,
    memory_counts=[200, 500],
    fanout_n=500,
    fanout_rates=[10, 100],
    fanout_seconds=2,
    reps=1,
    publish_seconds=2,
    high_rate=100,
    high_rate_k=2,
    personal_channels=50,
    personal_rates=[50, 100],
    nats_messages=20_000,
    interest_k=2,
    interest_channels=20,
    interest_carried=2,
    interest_rate=100,
)


# -- the machine: quiet, and who else used it ----------------------------------------


def _mine() -> set[int]:
    """This run: its processes and children, and what started it (``timeout``, a shell)."""
    mine = set(cost.descendants(os.getpid()))
    pid = os.getppid()
    while pid > 1:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return mine


_postmaster: list[int] = []


def postmaster() -> int:
    """The pid of the Postgres server the bench uses (its ``postmaster.pid``)."""
    if not _postmaster:

        async def data_directory() -> str:
            conn = await asyncpg.connect(PG)
            try:
                return str(await conn.fetchval("SHOW data_directory"))
            finally:
                await conn.close()

        directory = asyncio.run(data_directory())
        _postmaster.append(int((Path(directory) / "postmaster.pid").read_text().split()[0]))
    return _postmaster[0]


def others_running() -> list[str]:
    """Other tests or benchmarks (``pgrep -f``), not this run or its children."""
    found = subprocess.run(["pgrep", "-af", OTHERS], capture_output=True, text=True).stdout
    mine = _mine()
    return [line for line in found.splitlines() if int(line.split()[0]) not in mine]


def wait_until_quiet(limit: float = 1800) -> dict[str, Any]:
    """Until no other test or benchmark runs and the 1-minute load average is
    below ``QUIET_LOAD`` (this run's own load decays too)."""
    began = time.monotonic()
    said = 0.0
    while True:
        load, busy = os.getloadavg()[0], others_running()
        if load < QUIET_LOAD and not busy:
            return {"load1": load, "waited_s": round(time.monotonic() - began)}
        if time.monotonic() - began > limit:
            raise SystemExit(f"the machine did not become quiet in {limit:.0f} s: {busy}")
        if time.monotonic() - said > 60:
            print(f"  waiting for a quiet machine: load {load:.2f}, others {busy}", flush=True)
            said = time.monotonic()
        time.sleep(5)


def _all_processes() -> dict[int, tuple[str, float, float]]:
    """pid -> (comm, utime+stime, cutime+cstime) of every process, in seconds."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / cost.CLOCK_TICKS
        children = (int(fields[13]) + int(fields[14])) / cost.CLOCK_TICKS
        out[int(stat.parent.name)] = (comm, own, children)
    return out


@dataclass
class Machine:
    """CPU of the bench's Postgres server (every process of it, with what the
    postmaster reaped), and of the processes outside this run (and outside that
    server), at one moment."""

    at: float
    postgres: float
    foreign: dict[int, float]

    @classmethod
    def now(cls) -> Machine:
        procs = _all_processes()
        server = set(cost.descendants(postmaster()))
        mine = _mine() | server
        # The postmaster's reaped children are its backends that exited.
        pg = sum(procs[pid][1] for pid in server if pid in procs)
        pg += procs[postmaster()][2] if postmaster() in procs else 0.0
        foreign = {pid: own for pid, (_comm, own, _c) in procs.items() if pid not in mine}
        return cls(time.monotonic(), pg, foreign)

    def since(self, before: Machine) -> dict[str, Any]:
        wall = self.at - before.at
        foreign = sum(v - before.foreign.get(pid, 0.0) for pid, v in self.foreign.items())
        return {
            "wall_s": wall,
            "postgres_cpu_s": self.postgres - before.postgres,
            "foreign_cpu_s": foreign,
        }


def step_health(delta: dict[str, Any]) -> dict[str, Any]:
    others = others_running()
    foreign_share = delta["foreign_cpu_s"] / max(1e-6, delta["wall_s"])
    return {
        "foreign_cpu_share": foreign_share,
        "others": others,
        "disturbed": bool(others) or foreign_share > FOREIGN_LIMIT,
    }


# -- nats-server ---------------------------------------------------------------------


class NatsServer:
    """``nats-server`` on free ports with its monitoring endpoint (as tests/e2e/test_nats.py)."""

    def __init__(self, cpus: str | None = None) -> None:
        self.port, self.monitor_port = _free_port(), _free_port()
        cmd = [NATS_SERVER, "-a", HOST, "-p", str(self.port), "-m", str(self.monitor_port)]
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((HOST, self.port), timeout=1) as s,
            ):
                if s.recv(4096).startswith(b"INFO"):
                    return
            time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def pids(self) -> list[int]:
        return cost.descendants(self.process.pid)

    def varz(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"http://{HOST}:{self.monitor_port}/varz").json()
        return data

    def connz(self) -> list[dict[str, Any]]:
        r = httpx.get(f"http://{HOST}:{self.monitor_port}/connz", params={"subs": 1})
        return list(r.json()["connections"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- several instances on one database -----------------------------------------------


@dataclass
class Cluster:
    broker: str
    database: str
    instances: list[Ssehub]
    nats: NatsServer | None
    channel_ids: dict[str, int] = field(default_factory=dict)

    def stop(self) -> None:
        for instance in self.instances:
            with contextlib.suppress(Exception):
                instance.stop()
        if self.nats is not None:
            self.nats.stop()
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))


def start_cluster(broker: str, k: int, channels: list[str]) -> Cluster:
    """k ``ssehub serve`` on one new database (the first migrates it, the others
    start together), and a nats-server of their own for ``nats``."""
    database = f"ssehub_scaling_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin_sql(f'CREATE DATABASE "{database}"'))
    nats_server = NatsServer() if broker == "nats" else None
    # 8 instances x (pool + writer + listener) stay well under max_connections (100).
    env = {"SSEHUB_DB_POOL_SIZE": "4", "SSEHUB_BROKER": broker}
    if nats_server is not None:
        env["SSEHUB_NATS_URL"] = nats_server.url
    cluster = Cluster(broker, database, [], nats_server)
    try:
        cluster.instances.append(launch_ssehub(database, env, owns_database=False))
        with ThreadPoolExecutor(max(1, k - 1)) as pool:
            started = [pool.submit(launch_ssehub, database, env, False) for _ in range(k - 1)]
            cluster.instances += [f.result() for f in started]
        first = cluster.instances[0]
        for channel in channels:
            r = httpx.post(
                f"http://{HOST}:{first.port}/channels",
                json={"name": channel},
                headers=first.headers,
                timeout=30,
            )
            r.raise_for_status()
        cluster.channel_ids = asyncio.run(_channel_ids(database))
    except BaseException:
        cluster.stop()
        raise
    return cluster


async def _channel_ids(database: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url(database))
    try:
        return {r["name"]: r["id"] for r in await conn.fetch("SELECT name, id FROM channels")}
    finally:
        await conn.close()


METRIC = re.compile(
    r"^(ssehub_events_published_total|ssehub_events_delivered_total|"
    r'ssehub_broker_events_total\{source="(\w+)"\}) (\S+)$',
    re.MULTILINE,
)


async def instance_counters(http: httpx.AsyncClient, instance: Target) -> dict[str, float]:
    text = (await http.get(f"http://{HOST}:{instance.port}/metrics")).text
    out = {"published": 0.0, "delivered": 0.0, "log": 0.0, "nats": 0.0}
    for name, source, value in METRIC.findall(text):
        if source:
            out[source] = float(value)
        elif name.startswith("ssehub_events_published"):
            out["published"] = float(value)
        else:
            out["delivered"] = float(value)
    return out


PG_TABLE = (
    "SELECT coalesce(seq_scan, 0) AS seq_scan, coalesce(seq_tup_read, 0) AS seq_tup_read,"
    " coalesce(idx_scan, 0) AS idx_scan, coalesce(idx_tup_fetch, 0) AS idx_tup_fetch,"
    " n_tup_ins FROM pg_stat_user_tables WHERE relname = 'events'"
)
PG_DATABASE = (
    "SELECT xact_commit, tup_returned, tup_fetched, blks_hit, blks_read"
    " FROM pg_stat_database WHERE datname = current_database()"
)


@dataclass
class Snapshot:
    machine: Machine
    table: dict[str, float]
    database: dict[str, float]
    db_backends: dict[int, float]  # pid -> CPU s of this database's backends
    instances: list[dict[str, float]]
    nats: dict[str, float]


async def snapshot(cluster: Cluster, conn: Any) -> Snapshot:
    async with httpx.AsyncClient(timeout=10) as http:
        instances = []
        for instance in cluster.instances:
            counters = await instance_counters(http, instance)
            counters["cpu_s"] = cost.cpu_seconds(instance.pids())
            instances.append(counters)
    nats: dict[str, float] = {}
    if cluster.nats is not None:
        varz = cluster.nats.varz()
        nats = {key: float(varz[key]) for key in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}
        nats["cpu_s"] = cost.cpu_seconds(cluster.nats.pids())
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    table = dict(await conn.fetchrow(PG_TABLE))
    database = dict(await conn.fetchrow(PG_DATABASE))
    pids = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    backends = {r["pid"]: cost.cpu_seconds([r["pid"]]) for r in pids}
    return Snapshot(Machine.now(), table, database, backends, instances, nats)


def _diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: float(after[key]) - float(before.get(key, 0)) for key in after}


def delta(after: Snapshot, before: Snapshot) -> dict[str, Any]:
    machine = after.machine.since(before.machine)
    instances = [_diff(a, b) for a, b in zip(after.instances, before.instances, strict=True)]
    return {
        **machine,
        "events_table": _diff(after.table, before.table),
        "database": _diff(after.database, before.database),
        # A backend that appeared meanwhile counts from 0; one that left is not counted.
        "db_backends_cpu_s": sum(
            cpu - before.db_backends.get(pid, 0.0) for pid, cpu in after.db_backends.items()
        ),
        "instances": instances,
        "nats": _diff(after.nats, before.nats),
    }


def _flat(d: dict[str, Any]) -> dict[str, float]:
    """The additive figures of a delta, flattened: instances summed."""
    out: dict[str, float] = {
        "wall_s": d["wall_s"],
        "postgres_cpu_s": d["postgres_cpu_s"],
        "db_backends_cpu_s": d["db_backends_cpu_s"],
    }
    out |= {f"events_{k}": v for k, v in d["events_table"].items()}
    out |= {f"db_{k}": v for k, v in d["database"].items()}
    for key in ("published", "delivered", "log", "nats", "cpu_s"):
        out[f"instances_{key}"] = sum(i[key] for i in d["instances"])
    out |= {f"nats_{k}": v for k, v in d["nats"].items()}
    return out


def net_of_idle(run: dict[str, Any], idle: dict[str, Any]) -> dict[str, float]:
    """The run's figures less what the same time idle costs (listener turns,
    retention, the signing-key refresh, background writers)."""
    r, i = _flat(run), _flat(idle)
    scale = r["wall_s"] / max(1e-6, i["wall_s"])
    return {k: v - i.get(k, 0.0) * scale for k, v in r.items() if k != "wall_s"}


def per_event(figures: dict[str, float], events: float) -> dict[str, float]:
    events = max(1.0, events)
    return {
        "pg_events_idx_tup_fetch": figures["events_idx_tup_fetch"] / events,
        "pg_events_seq_tup_read": figures["events_seq_tup_read"] / events,
        "pg_events_scans": (figures["events_idx_scan"] + figures["events_seq_scan"]) / events,
        "pg_db_tup_fetched": figures["db_tup_fetched"] / events,
        "pg_db_tup_returned": figures["db_tup_returned"] / events,
        "pg_db_xact_commit": figures["db_xact_commit"] / events,
        "pg_cpu_us": 1e6 * figures["postgres_cpu_s"] / events,
        "pg_backends_cpu_us": 1e6 * figures["db_backends_cpu_s"] / events,
        "log_rows": figures["instances_log"] / events,
        "nats_received": figures["instances_nats"] / events,
        "deliveries": figures["instances_delivered"] / events,
        "instances_cpu_us": 1e6 * figures["instances_cpu_s"] / events,
        "nats_in_msgs": figures.get("nats_in_msgs", 0.0) / events,
        "nats_out_msgs": figures.get("nats_out_msgs", 0.0) / events,
        "nats_in_bytes": figures.get("nats_in_bytes", 0.0) / events,
        "nats_out_bytes": figures.get("nats_out_bytes", 0.0) / events,
        "nats_cpu_us": 1e6 * figures.get("nats_cpu_s", 0.0) / events,
    }


async def publish_paced(
    cluster: Cluster, publishers: list[int], channels: list[str], rate: float, seconds: float
) -> int:
    """``rate`` single publishes a second for ``seconds``: event n to channel n mod
    len(channels), through an instance drawn (seeded) from ``publishers``, so the
    committer is not tied to the channel. Eight keep-alive connections per
    instance; not waiting for one answer before the next is due."""
    free: dict[int, asyncio.Queue[HttpClient]] = {}
    for i in publishers:
        free[i] = asyncio.Queue()
        for _ in range(8):
            free[i].put_nowait(cluster.instances[i].client())
    chooser = random.Random(13)
    sent = 0

    async def one(n: int, i: int) -> None:
        nonlocal sent
        instance = cluster.instances[i]
        client = await free[i].get()
        try:
            channel = channels[n % len(channels)]
            body = instance.publish_body(channel, {"t": time.time(), "n": n})
            status, _ = await client.post(instance.publish_path(channel), body)
            if status == 201:
                sent += 1
        finally:
            free[i].put_nowait(client)

    start = time.monotonic()
    tasks = []
    for n in range(int(rate * seconds)):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n, chooser.choice(publishers))))
    await asyncio.gather(*tasks)
    for queue in free.values():
        while not queue.empty():
            queue.get_nowait().close()
    return sent


def placement(
    variant: str, k: int, channels: list[str], per_instance: int, carried: int = 0
) -> list[list[str]]:
    """The channel of each stream, per instance (``interest``: ``carried`` channels
    each, instance i the i-th run of them; the rest carried by none)."""
    if variant == "all":
        return [[channels[j % len(channels)] for j in range(per_instance)] for _ in range(k)]
    if variant == "disjoint":
        out = []
        for i in range(k):
            mine = [c for j, c in enumerate(channels) if j % k == i]
            out.append([mine[j % len(mine)] for j in range(per_instance)])
        return out
    if variant == "personal":  # instance 0 publishes, instance 1 one stream per channel
        return [[], list(channels)]
    if variant == "interest":
        runs = [channels[i * carried : (i + 1) * carried] for i in range(k)]
        return [[mine[j % len(mine)] for j in range(per_instance)] for mine in runs]
    raise ValueError(variant)


async def measure_variant(
    cluster: Cluster,
    variant: str,
    channels: list[str],
    plan: Plan,
    rate: float,
    publishers: list[int],
) -> dict[str, Any]:
    k = len(cluster.instances)
    where = placement(variant, k, channels, plan.streams_per_instance, plan.interest_carried)
    totals = Totals()
    streams: list[tuple[str, StreamProtocol]] = []
    for instance, names in zip(cluster.instances, where, strict=True):
        opened = await open_streams(
            HOST, instance.port, [instance.stream_path(c) for c in names], totals
        )
        # open_streams appends in completion order: match streams to channels by path.
        for stream in opened:
            path = stream.request.split(b" ", 2)[1].decode()
            streams.append((path.split("/")[2], stream))
    await asyncio.sleep(2)  # subscriptions (NATS interest) settle
    conn = await asyncpg.connect(database_url(cluster.database))
    try:
        s0 = await snapshot(cluster, conn)
        await asyncio.sleep(plan.idle_seconds)
        s1 = await snapshot(cluster, conn)
        totals.events, totals.latencies = 0, []
        sent = await publish_paced(cluster, publishers, channels, rate, plan.seconds)
        per_channel = sent / len(channels)  # channels are published to in turn
        wanted = sum(per_channel for _ in streams)
        settle = time.monotonic() + 10
        while totals.events < wanted and time.monotonic() < settle:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # backends flush their statistics at most every second
        s2 = await snapshot(cluster, conn)
    finally:
        await conn.close()
        close_streams([s for _, s in streams])
    idle, run = delta(s1, s0), delta(s2, s1)
    net = net_of_idle(run, idle)
    published = _flat(run)["instances_published"]
    row = {
        "broker": cluster.broker,
        "k": k,
        "variant": variant,
        "channels": len(channels),
        "streams": len(streams),
        "rate": rate,
        "seconds": plan.seconds,
        "sent": sent,
        "published": published,
        "deliveries_wanted": wanted,
        "deliveries_received": totals.events,
        "pct_delivered": 100 * totals.events / max(1, wanted),
        "p50_ms": 1000 * percentile(totals.latencies, 50),
        "p99_ms": 1000 * percentile(totals.latencies, 99),
        "per_event_net": per_event(net, published),
        "per_event_raw": per_event(_flat(run), published),
        "idle_per_s": {k2: v / max(1e-6, idle["wall_s"]) for k2, v in _flat(idle).items()},
        "run": run,
        "idle": idle,
        **step_health(run),
    }
    if cluster.nats is not None:
        row["nats_subscriptions"] = [
            len(c.get("subscriptions_list", [])) for c in cluster.nats.connz()
        ]
    return row


def _describe(row: dict[str, Any]) -> str:
    e = row["per_event_net"]
    return (
        f"    {row['broker']:8} k={row['k']} {row['variant']:8} {row['sent']} ev, "
        f"{row['pct_delivered']:.1f}% delivered, per event: log rows {e['log_rows']:.2f}, "
        f"pg fetch {e['pg_events_idx_tup_fetch']:.2f}, xacts {e['pg_db_xact_commit']:.2f}, "
        f"pg {e['pg_cpu_us']:.0f} us, instances {e['instances_cpu_us']:.0f} us, "
        f"nats in/out {e['nats_in_msgs']:.2f}/{e['nats_out_msgs']:.2f}"
        + (" DISTURBED" if row["disturbed"] else "")
    )


def run_cluster(plan: Plan, brokers: list[str], ks: list[int]) -> list[dict[str, Any]]:
    channels = [f"c{j}" for j in range(plan.channels)]
    rows = []
    for broker in brokers:
        for k in ks:
            print(f"  [{broker}] k={k}: starting", flush=True)
            cluster = start_cluster(broker, k, channels)
            try:
                for variant in ("all", "disjoint") if k > 1 else ("all",):
                    row = asyncio.run(
                        measure_variant(cluster, variant, channels, plan, plan.rate, list(range(k)))
                    )
                    print(_describe(row), flush=True)
                    rows.append(row)
            finally:
                cluster.stop()
        if plan.high_rate_k in ks:
            k = plan.high_rate_k
            print(f"  [{broker}] k={k} at {plan.high_rate:g} events/s: starting", flush=True)
            cluster = start_cluster(broker, k, channels)
            try:
                row = asyncio.run(
                    measure_variant(cluster, "all", channels, plan, plan.high_rate, list(range(k)))
                )
                print(_describe(row), flush=True)
                rows.append(row)
            finally:
                cluster.stop()
    return rows


def run_interest(plan: Plan, brokers: list[str]) -> list[dict[str, Any]]:
    """Issue #13's scenario (module docstring), once per broker."""
    channels = [f"i{j}" for j in range(plan.interest_channels)]
    k, rows = plan.interest_k, []
    for broker in brokers:
        print(f"  [{broker}] k={k}, {len(channels)} channels: starting", flush=True)
        cluster = start_cluster(broker, k, channels)
        try:
            row = asyncio.run(
                measure_variant(
                    cluster, "interest", channels, plan, plan.interest_rate, list(range(k))
                )
            )
            print(_describe(row), flush=True)
            rows.append(row)
        finally:
            cluster.stop()
    return rows


def run_personal(plan: Plan, brokers: list[str]) -> list[dict[str, Any]]:
    channels = [f"p{j}" for j in range(plan.personal_channels)]
    rows = []
    for broker in brokers:
        print(f"  [{broker}] personal channels: starting", flush=True)
        cluster = start_cluster(broker, 2, channels)
        try:
            for rate in plan.personal_rates:
                rows.append(_personal(cluster, channels, plan, rate))
        finally:
            cluster.stop()
    return rows


def _personal(cluster: Cluster, channels: list[str], plan: Plan, rate: float) -> dict[str, Any]:
    """Publishes through instance 0 only; instance 1 carries one stream per channel."""
    row = asyncio.run(measure_variant(cluster, "personal", channels, plan, rate, [0]))
    scale = row["run"]["wall_s"] / max(1e-6, row["idle"]["wall_s"])
    for name, i in (("receiver", 1), ("publisher", 0)):
        run, idle = row["run"]["instances"][i], row["idle"]["instances"][i]
        cpu = run["cpu_s"] - idle["cpu_s"] * scale
        row[f"{name}_cpu_us_per_event"] = 1e6 * cpu / max(1.0, row["published"])
    print(
        _describe(row) + f"; receiver {row['receiver_cpu_us_per_event']:.0f} us/event,"
        f" publisher {row['publisher_cpu_us_per_event']:.0f} us/event",
        flush=True,
    )
    return row


# -- one process ---------------------------------------------------------------------


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        out[name] = int(rest.split()[0])
    return out


def _sockstat_tcp_pages() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    return 0


async def kernel_memory(target: Target, n: int) -> dict[str, float]:
    """Slab (sockets, files, epoll items) and TCP buffer pages gained by opening
    ``n`` idle streams, per connection: both ends are on this machine, so half of
    it (an estimate: anything else allocating meanwhile counts too)."""
    await asyncio.sleep(1)
    before, pages = _meminfo(), _sockstat_tcp_pages()
    totals = Totals()
    streams = await open_streams(HOST, target.port, [target.stream_path("idle")] * n, totals)
    await asyncio.sleep(2)
    after, pages_after = _meminfo(), _sockstat_tcp_pages()
    close_streams(streams)
    slab = (after["Slab"] - before["Slab"]) / n / 2
    buffers = (pages_after - pages) * 4 / n / 2
    return {"n": n, "slab_kib_per_connection": slab, "tcp_buffer_kib_per_connection": buffers}


def _single(name: str, work: Any) -> Any:
    """``work(target)`` against one fresh ssehub; Postgres and foreign CPU metered."""
    target = start_ssehub(["idle", "fanout"])
    try:
        before = Machine.now()
        value = asyncio.run(work(target))
        d = Machine.now().since(before)
        return {"value": value, **d, **step_health(d)}
    finally:
        target.stop()


def run_memory(plan: Plan) -> dict[str, Any]:
    async def work(target: Target) -> dict[str, Any]:
        rss = await idle_memory(target, plan.memory_counts)
        kernel = await kernel_memory(target, plan.memory_counts[-1])
        return {"rss": rss, "kernel": kernel}

    return dict(_single("memory", work))


def run_fanout(plan: Plan) -> dict[str, Any]:
    async def work(target: Target) -> list[dict[str, Any]]:
        rows = await fan_out(
            target, plan.fanout_n, plan.fanout_rates, plan.fanout_seconds, plan.reps
        )
        for row in rows:
            busy = row["server_cpu_pct"] / 100
            row["cpu_us_per_delivery"] = 1e6 * busy / max(1.0, row["delivered_per_s"])
            row["deliveries_per_core_s"] = row["delivered_per_s"] / max(1e-6, busy)
        return rows

    return dict(_single("fanout", work))


def run_publish(plan: Plan) -> dict[str, Any]:
    async def work(target: Target) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {"single": [], "batch": []}
        for mode, batch, clients in (("single", 1, 32), ("batch", 1000, 4)):
            for _ in range(plan.reps):
                before = Machine.now()
                row = await publish_throughput(target, plan.publish_seconds, batch, clients)
                d = Machine.now().since(before)
                row["postgres_cpu_pct"] = 100 * d["postgres_cpu_s"] / d["wall_s"]
                row["server_cpu_us_per_event"] = 1e4 * row["server_cpu_pct"] / max(1, row["per_s"])
                row["postgres_cpu_us_per_event"] = (
                    1e4 * row["postgres_cpu_pct"] / max(1, row["per_s"])
                )
                out[mode].append(row)
                print(
                    f"    {mode}: {row['per_s']:,.0f} events/s, server {row['server_cpu_pct']:.0f}%,"
                    f" postgres {row['postgres_cpu_pct']:.0f}%",
                    flush=True,
                )
        return out

    entry = dict(_single("publish", work))
    entry["two_writers"] = _two_writers(plan)
    return entry


def _two_writers(plan: Plan) -> list[dict[str, Any]]:
    """Batches through two instances on one database at once (two clients each,
    four in all as above): both writers take the same publish lock, so this is
    the ceiling with k writers instead of one."""
    cluster = start_cluster("postgres", 2, ["fanout"])
    rows = []
    try:
        for _ in range(plan.reps):

            async def both() -> list[dict[str, Any]]:
                return list(
                    await asyncio.gather(
                        *(
                            publish_throughput(i, plan.publish_seconds, 1000, 2)
                            for i in cluster.instances
                        )
                    )
                )

            before = Machine.now()
            parts = asyncio.run(both())
            d = Machine.now().since(before)
            row = {
                "per_s": sum(p["per_s"] for p in parts),
                "server_cpu_pct": sum(p["server_cpu_pct"] for p in parts),
                "postgres_cpu_pct": 100 * d["postgres_cpu_s"] / d["wall_s"],
                "parts": parts,
                **step_health(d),
            }
            print(
                f"    batch through 2 instances: {row['per_s']:,.0f} events/s,"
                f" servers {row['server_cpu_pct']:.0f}%, postgres {row['postgres_cpu_pct']:.0f}%",
                flush=True,
            )
            rows.append(row)
    finally:
        cluster.stop()
    return rows


# -- nats-server throughput ----------------------------------------------------------


async def _nats_run(server: NatsServer, count: int, size: int, subscribers: int) -> dict[str, Any]:
    import nats

    pub = await nats.connect(server.url)
    subs = [await nats.connect(server.url) for _ in range(subscribers)]
    received = 0
    done = asyncio.Event()
    want = count * subscribers

    async def on_message(_msg: Any) -> None:
        nonlocal received
        received += 1
        if received >= want:
            done.set()

    for sub in subs:
        await sub.subscribe("bench.x", cb=on_message, pending_msgs_limit=count + 1)
        await sub.flush()
    payload = b"x" * size
    varz0, cpu0 = server.varz(), cost.cpu_seconds(server.pids())
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    began = time.monotonic()
    for i in range(count):
        await pub.publish("bench.x", payload)
        if i % 1000 == 0:
            await asyncio.sleep(0)  # let the subscribers read as it goes
    await pub.flush()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 120)
    took = time.monotonic() - began
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    varz1, cpu1 = server.varz(), cost.cpu_seconds(server.pids())
    for client in (pub, *subs):
        await client.close()
    msgs = (varz1["in_msgs"] - varz0["in_msgs"]) + (varz1["out_msgs"] - varz0["out_msgs"])
    server_cpu = cpu1 - cpu0
    client_cpu = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    return {
        "subscribers": subscribers,
        "size": size,
        "published": count,
        "received": received,
        "seconds": took,
        "in_per_s": count / took,
        "out_per_s": received / took,
        "server_cpu_pct": 100 * server_cpu / took,
        "client_cpu_pct": 100 * client_cpu / took,
        "server_cpu_us_per_msg": 1e6 * server_cpu / max(1, msgs),
        "server_msgs_per_core_s": msgs / max(1e-9, server_cpu),
    }


def run_nats(plan: Plan) -> dict[str, Any]:
    """nats-py driving a nats-server pinned to CPU 0 from this process on CPU 1:
    the client is the bottleneck; the server's CPU per message is the figure."""
    server = NatsServer(cpus="0")
    try:
        before = Machine.now()
        rows = []
        for subscribers in (1, 4):
            count = plan.nats_messages // subscribers
            row = asyncio.run(_nats_run(server, count, plan.nats_size, subscribers))
            print(
                f"    nats 1 -> {subscribers}: in {row['in_per_s']:,.0f}/s, out {row['out_per_s']:,.0f}/s,"
                f" server {row['server_cpu_pct']:.0f}% ({row['server_cpu_us_per_msg']:.2f} us/msg),"
                f" client {row['client_cpu_pct']:.0f}%",
                flush=True,
            )
            rows.append(row)
        d = Machine.now().since(before)
        return {"value": rows, "version": _nats_version(), **d, **step_health(d)}
    finally:
        server.stop()


def _nats_version() -> str:
    out = subprocess.run([NATS_SERVER, "--version"], capture_output=True, text=True)
    return out.stdout.strip() or out.stderr.strip()


# -- the run -------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    pg = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    settings = asyncio.run(_pg_settings())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(_meminfo()["MemTotal"] / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "postgres": pg,
        "postgres_settings": settings,
        "nats_server": _nats_version(),
    }


async def _pg_settings() -> dict[str, str]:
    conn = await asyncpg.connect(PG)
    try:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
            ["max_connections", "shared_buffers", "synchronous_commit", "fsync", "wal_level"],
        )
        return {r["name"]: r["setting"] for r in rows}
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling")
    parser.add_argument("--quick", action="store_true", help="tiny numbers, for development")
    parser.add_argument("--only", action="append", choices=PHASES, help="run these phases")
    parser.add_argument(
        "--broker", action="append", choices=BROKERS, help="cluster/personal: only these"
    )
    parser.add_argument("--k", action="append", type=int, help="cluster: only these k")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    parser.add_argument("--out", type=Path, help="raw results (default bench/results/scaling.json)")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {1})
    uvloop.install()
    postmaster()  # found once, outside any event loop
    plan = QUICK if args.quick else Plan()
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results["plan"] = asdict(plan)
    machine = machine_description()
    results.setdefault("machine", machine)  # the first run's; each phase records its own
    results.setdefault("phases", {})
    brokers = args.broker or BROKERS
    ks = args.k or plan.ks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    RUNNING.write_text(f"{os.getpid()}\n")
    try:
        for phase in args.only or PHASES:
            if not args.no_wait:
                quiet = wait_until_quiet()
                print(
                    f"[{phase}] quiet: load {quiet['load1']:.2f} after {quiet['waited_s']} s",
                    flush=True,
                )
            else:
                quiet = {"load1": os.getloadavg()[0], "waited_s": 0, "not_waited": True}
            began = time.monotonic()
            at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            if phase == "cluster":
                rows = run_cluster(plan, brokers, ks)
                old = results["phases"].get("cluster", {}).get("value", [])
                redone = {(x["broker"], x["k"], x["rate"]) for x in rows}
                keep = [r for r in old if (r["broker"], r["k"], r["rate"]) not in redone]
                value: Any = sorted(
                    keep + rows,
                    key=lambda r: (BROKERS.index(r["broker"]), r["rate"], r["k"], r["variant"]),
                )
                entry = {"value": value}
            elif phase in ("personal", "interest"):
                rows = (run_personal if phase == "personal" else run_interest)(plan, brokers)
                old = results["phases"].get(phase, {}).get("value", [])
                keep = [r for r in old if r["broker"] not in {x["broker"] for x in rows}]
                entry = {"value": keep + rows}
            else:
                entry = {
                    "memory": run_memory,
                    "fanout": run_fanout,
                    "publish": run_publish,
                    "nats": run_nats,
                }[phase](plan)
            entry |= {
                "measured_at": at,
                "machine": machine,
                "quiet_before": quiet,
                "took_s": round(time.monotonic() - began),
            }
            results["phases"][phase] = entry
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(results, indent=1, default=str) + "\n")
            print(f"[{phase}] took {entry['took_s']} s; wrote {out}", flush=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            RUNNING.unlink()


if __name__ == "__main__":
    main()
