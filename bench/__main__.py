"""Run every scenario against ssehub and the tutorial baseline; write docs/BENCHMARKS.md.

    python -m bench            # the full suite (about 8 minutes)
    python -m bench --quick    # a smoke run with small numbers

The server runs pinned to CPU 0 (taskset), this load generator on CPU 1,
one server worker, the machine's real Postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvloop

from bench.loadgen import HttpClient, Totals, open_streams

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("SSEHUB_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
SECRET = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex
ADMIN = ("bench", "bench-password-1")
HOST = "127.0.0.1"


# -- servers ---------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    database: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # for publishing
    stream_query: str = ""  # appended to stream paths

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def publish_path(self, channel: str) -> str:
        return f"/channels/{channel}/events" if self.name == "ssehub" else f"/publish/{channel}"

    def stream_path(self, channel: str) -> str:
        if self.name == "ssehub":
            return f"/channels/{channel}/stream?{self.stream_query}"
        return f"/stream/{channel}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self.database:
            asyncio.run(_admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))


async def _admin_sql(statement: str) -> None:
    conn = await asyncpg.connect(PG)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_ready(port: int, path: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}{path}", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server not ready")


def start_ssehub(channels: list[str]) -> Target:
    database = f"ssehub_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin_sql(f'CREATE DATABASE "{database}"'))
    port = _free_port()
    env = {
        **os.environ,
        "SSEHUB_DATABASE_URL": PG.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[
            0
        ]
        + f"/{database}",
        "SSEHUB_SECRET_KEY": SECRET,
        "SSEHUB_ADMIN_USERNAME": ADMIN[0],
        "SSEHUB_ADMIN_PASSWORD": ADMIN[1],
        "SSEHUB_MAX_STREAMS_PER_USER": "1000000",
        # The baselines run with uvicorn's --log-level warning: no access log either.
        "SSEHUB_ACCESS_LOG": "false",
    }
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_ready(port, "/readyz", process)
    base = f"http://{HOST}:{port}"
    token = httpx.post(
        f"{base}/auth/token", data={"username": ADMIN[0], "password": ADMIN[1]}
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    for channel in channels:
        httpx.post(f"{base}/channels", json={"name": channel}, headers=headers)
    stream_token = httpx.post(f"{base}/auth/stream-token", headers=headers).json()["stream_token"]
    return Target("ssehub", port, process, database, headers, f"access_token={stream_token}")


def start_baseline(module: str = "app") -> Target:
    """The tutorial (``app``) or the same with a lean response (``lean``)."""
    port = _free_port()
    cmd = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "uvicorn",
        f"bench.baseline.{module}:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_ready(port, "/docs", process)
    return Target("baseline" if module == "app" else module, port, process)


# -- scenarios -------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def idle_memory(target: Target, counts: list[int]) -> dict[str, float]:
    """RSS growth per open idle stream, at each N."""
    totals = Totals()
    await open_streams(HOST, target.port, [target.stream_path("idle")] * 50, totals)
    await asyncio.sleep(1)
    before = target.rss_kib()
    opened = 50
    result: dict[str, float] = {}
    transports = []
    for n in counts:
        transports += await open_streams(
            HOST, target.port, [target.stream_path("idle")] * (n - opened), totals
        )
        opened = n
        await asyncio.sleep(2)
        result[f"kib_per_stream_{n}"] = (target.rss_kib() - before) / (n - 50)
    result["failed"] = totals.failed
    for t in transports:
        t.close()
    return result


# How long past its schedule a publish may still be sent. The tutorial, saturated
# by 10,000 streams, answers a publish in about half a second; unbounded, its
# 10k x 100/s measurement took minutes and `make bench` over 10 of them.
PUBLISH_GRACE_SECONDS = 2.0


async def _publish_at(target: Target, channel: str, rate: float, seconds: float) -> int:
    """Publish at a fixed rate, not waiting for one answer before the next is due
    (8 keep-alive connections), so the scenario measures delivery, not publish latency.
    Returns how many were published: a publish that cannot be sent within
    ``PUBLISH_GRACE_SECONDS`` of its time is not sent at all."""
    clients = [HttpClient(HOST, target.port, target.headers) for _ in range(8)]
    free: asyncio.Queue[HttpClient] = asyncio.Queue()
    for client in clients:
        free.put_nowait(client)
    sent = 0

    async def one(n: int) -> None:
        nonlocal sent
        client = await free.get()
        try:
            if time.monotonic() > start + seconds + PUBLISH_GRACE_SECONDS:
                return  # a server this far behind on publishes has been measured enough
            body = json.dumps({"type": "message", "data": {"t": time.time(), "n": n}}).encode()
            status, _ = await client.post(target.publish_path(channel), body)
            if status in (200, 201):
                sent += 1
        finally:
            free.put_nowait(client)

    start = time.monotonic()
    tasks = []
    total = int(rate * seconds)
    for n in range(total):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    for client in clients:
        client.close()
    return sent


async def _quiet(totals: Totals, limit: float = 15) -> None:
    """Until no frame has arrived for a second (at most ``limit`` s): a server
    that fell behind drains its backlog before the next measurement starts, so
    that one does not count or wait behind the last one's frames (bounded, to
    keep `make bench` within 10 minutes when the tutorial falls far behind)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = totals.events
        await asyncio.sleep(1)
        if totals.events == before:
            return


async def fan_out(
    target: Target, n: int, rates: list[float], seconds: float, reps: int
) -> list[dict[str, Any]]:
    """N subscribers on one channel; publish at each rate; what arrives, how fast, how late."""
    channel = "fanout"
    totals = Totals()
    transports = await open_streams(HOST, target.port, [target.stream_path(channel)] * n, totals)
    await asyncio.sleep(1)
    rows: list[dict[str, Any]] = []
    for rate in rates:
        for _ in range(reps):
            if rows:
                await _quiet(totals)
            totals.events = 0
            totals.latencies = []
            start = time.monotonic()
            sent = await _publish_at(target, channel, rate, seconds)
            in_window = totals.events
            window = time.monotonic() - start
            # Let what is in flight arrive (bounded), then count deliveries.
            settle_deadline = time.monotonic() + 5
            while time.monotonic() < settle_deadline and totals.events < sent * n:
                await asyncio.sleep(0.2)
            rows.append(
                {
                    "n": n,
                    "rate": rate,
                    "sent": sent,
                    "delivered_per_s": in_window / window,
                    "wanted_per_s": rate * n,
                    "pct_delivered": 100 * totals.events / max(1, sent * n),
                    "p50_ms": 1000 * percentile(totals.latencies, 50),
                    "p99_ms": 1000 * percentile(totals.latencies, 99),
                }
            )
    for t in transports:
        t.close()
    await asyncio.sleep(1)
    return rows


async def resume(target: Target, missed: int, reps: int) -> list[float]:
    """Seconds from connect to the last of ``missed`` events, replayed from the log."""
    if target.name != "ssehub":
        return []
    times = []
    for rep in range(reps):
        channel = f"resume{missed}x{rep}"
        httpx.post(
            f"http://{HOST}:{target.port}/channels", json={"name": channel}, headers=target.headers
        )
        first = None
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{target.port}", headers=target.headers
        ) as c:
            for start in range(0, missed, 1000):
                events = [
                    {"data": {"t": 0, "i": i}} for i in range(start, min(missed, start + 1000))
                ]
                r = await c.post(
                    f"/channels/{channel}/events/batch", json={"events": events}, timeout=60
                )
                first = first or r.json()["events"][0]["id"]
        totals = Totals()
        began = time.monotonic()
        path = target.stream_path(channel)
        transports = await open_streams(
            HOST, target.port, [path], totals, headers={"Last-Event-ID": str(first - 1)}
        )
        while totals.events < missed and time.monotonic() - began < 30:
            await asyncio.sleep(0.001)
        times.append(time.monotonic() - began)
        for t in transports:
            t.close()
    return times


async def publish_throughput(target: Target, seconds: float, batch: int, clients: int) -> float:
    """Events per second committed by ``clients`` concurrent keep-alive publishers."""
    channel = "fanout"
    if batch > 1 and target.name != "ssehub":
        return float("nan")
    path = target.publish_path(channel) + ("/batch" if batch > 1 else "")
    body = (
        json.dumps({"events": [{"data": {"i": i}} for i in range(batch)]})
        if batch > 1
        else json.dumps({"data": {"i": 1}})
    ).encode()
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        client = HttpClient(HOST, target.port, target.headers)
        try:
            while time.monotonic() < stop_at:
                status, _ = await client.post(path, body)
                if status in (200, 201):
                    done += batch
        finally:
            client.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.monotonic() - started)


# -- the run ---------------------------------------------------------------------


@dataclass
class Plan:
    memory_counts: list[int]
    fan_out_n: list[int]
    rates: list[float]
    seconds: float
    reps: int
    resume_sizes: list[int]
    publish_seconds: float


# The default: medians of three, in about 7 minutes on 2 cores (the 10-minute
# budget of `make bench`). `--seconds 10` publishes for the 10 s.
FULL = Plan([1000, 5000, 10000], [1000, 10000], [10, 100], 5, 3, [1000, 10000], 5)
QUICK = Plan([500, 1000], [500], [10, 100], 3, 1, [1000], 2)


def run_target(name: str, plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def fresh() -> Target:
        if name == "ssehub":
            return start_ssehub(["idle", "fanout"])
        return start_baseline("lean" if name == "lean" else "app")

    def with_target(work: Callable[[Target], Awaitable[Any]]) -> Any:
        began = time.monotonic()
        target = fresh()
        try:
            return asyncio.run(work(target))
        finally:
            target.stop()
            print(f"[{name}]   took {time.monotonic() - began:.0f} s", flush=True)

    if name == "lean":
        # Only the response differs from the baseline: compare where it matters most.
        n = max(plan.fan_out_n)
        print(f"[{name}] fan-out to {n}", flush=True)
        results["fan_out"] = with_target(lambda t: fan_out(t, n, plan.rates, plan.seconds, 1))
        return results
    print(f"[{name}] idle memory", flush=True)
    results["memory"] = with_target(lambda t: idle_memory(t, plan.memory_counts))
    results["fan_out"] = []
    for n in plan.fan_out_n:
        print(f"[{name}] fan-out to {n}", flush=True)
        results["fan_out"] += with_target(
            lambda t, n=n: fan_out(t, n, plan.rates, plan.seconds, plan.reps)
        )
    print(f"[{name}] resume and publish", flush=True)

    async def resume_and_publish(t: Target) -> dict[str, Any]:
        out: dict[str, Any] = {"resume": {}}
        for size in plan.resume_sizes:
            out["resume"][size] = await resume(t, size, plan.reps)
        out["publish_single"] = [
            await publish_throughput(t, plan.publish_seconds, 1, 32) for _ in range(plan.reps)
        ]
        out["publish_batch"] = [
            await publish_throughput(t, plan.publish_seconds, 1000, 4) for _ in range(plan.reps)
        ]
        return out

    results.update(with_target(resume_and_publish))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small numbers, one repetition")
    parser.add_argument(
        "--only",
        choices=["ssehub", "baseline", "lean"],
        help="run one target; the others' figures are kept from the last run's raw results",
    )
    parser.add_argument("--reps", type=int, help="repetitions per scenario (default 3)")
    parser.add_argument("--seconds", type=float, help="publishing time per fan-out run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {1})
    uvloop.install()
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan.reps = args.reps
    if args.seconds:
        plan.seconds = args.seconds
    started = time.time()
    raw = ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")
    results: dict[str, Any] = {}
    if args.only and raw.exists():
        results = json.loads(raw.read_text())
    for name in [args.only] if args.only else ["ssehub", "baseline", "lean"]:
        results[name] = run_target(name, plan)
    raw.parent.mkdir(exist_ok=True)
    raw.write_text(json.dumps(results, indent=1, default=str))
    from bench.report import write_report

    write_report(Path(args.out), results, plan, time.time() - started, " ".join(sys.argv[1:]))
    print(f"wrote {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
