"""The scenarios, each run the same way against every target (``bench.targets``).

Every measurement is metered (``bench.cost.Meter``): each row carries the
load generator's and the server's CPU over its window, so the report can
tell a server's figure from the generator's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.cost import Meter
from bench.loadgen import HttpClient, StreamProtocol, Totals, close_streams, open_streams
from bench.targets import HOST, Target

# Streams being opened at once (connect until response headers). The same for
# every target; under both servers' listen backlogs (uvicorn 2048, our nginx
# 4096), so a storm measures the servers, not the kernel's SYN retry timers.
OPEN_CONCURRENCY = 1000

# How long past its schedule a publish may still be sent. The tutorial, saturated
# by 10,000 streams, answers a publish in about half a second; unbounded, its
# 10k x 100/s measurement took minutes and `make bench` over 10 of them.
PUBLISH_GRACE_SECONDS = 2.0

# A reconnect storm that has not caught up by then is reported as such.
STORM_LIMIT_SECONDS = 60.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def idle_memory(target: Target, counts: list[int]) -> dict[str, float]:
    """RSS growth per open idle stream, at each N."""
    totals = Totals()
    streams = await open_streams(HOST, target.port, [target.stream_path("idle")] * 50, totals)
    await asyncio.sleep(1)
    before = target.rss_kib()
    opened = 50
    result: dict[str, float] = {}
    for n in counts:
        streams += await open_streams(
            HOST, target.port, [target.stream_path("idle")] * (n - opened), totals
        )
        opened = n
        await asyncio.sleep(2)
        result[f"kib_per_stream_{n}"] = (target.rss_kib() - before) / (n - 50)
    result["failed"] = totals.failed
    close_streams(streams)
    return result


async def _publish_at(target: Target, channel: str, rate: float, seconds: float) -> int:
    """Publish at a fixed rate, not waiting for one answer before the next is due
    (8 keep-alive connections), so the scenario measures delivery, not publish latency.
    Returns how many were published: a publish that cannot be sent within
    ``PUBLISH_GRACE_SECONDS`` of its time is not sent at all."""
    clients = [target.client() for _ in range(8)]
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
            body = target.publish_body(channel, {"t": time.time(), "n": n})
            status, _ = await client.post(target.publish_path(channel), body)
            if 200 <= status < 300:
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
    keep `make bench` within 10 minutes when a server falls far behind)."""
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
    streams = await open_streams(HOST, target.port, [target.stream_path(channel)] * n, totals)
    await asyncio.sleep(1)
    rows: list[dict[str, Any]] = []
    for rate in rates:
        for _ in range(reps):
            if rows:
                await _quiet(totals)
            totals.events = 0
            totals.latencies = []
            meter = Meter(target, totals)
            start = time.monotonic()
            sent = await _publish_at(target, channel, rate, seconds)
            in_window = totals.events
            window = time.monotonic() - start
            cost = meter.read()
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
                    **cost,
                }
            )
    close_streams(streams)
    await asyncio.sleep(1)
    return rows


async def _anchor(target: Target, channel: str) -> str:
    """Create ``channel`` and publish one event to it: the position clients resume after."""
    await target.create_channel(channel)
    client = target.client()
    try:
        return await target.publish(client, channel, {"t": 0, "i": -1})
    finally:
        client.close()


async def open_rate(target: Target, n: int, reps: int) -> list[dict[str, Any]]:
    """Streams opened per second, ``OPEN_CONCURRENCY`` at a time, each with its
    credentials (ssehub: a stream token; the others need none) and a resume
    position (the channel's last event, so nothing is replayed): from the first
    connect to the last stream's response headers."""
    channel = "opening"
    position = await _anchor(target, channel)
    rows = []
    for _ in range(reps):
        totals = Totals()
        open_times: list[float] = []
        meter = Meter(target, totals)
        began = time.monotonic()
        streams = await open_streams(
            HOST,
            target.port,
            [target.stream_path(channel)] * n,
            totals,
            sample_every=0,
            headers={"Last-Event-ID": position},
            concurrency=OPEN_CONCURRENCY,
            open_times=open_times,
        )
        took = time.monotonic() - began
        cost = meter.read()
        rows.append(
            {
                "n": n,
                "opened": totals.connected,
                "failed": totals.failed,
                "seconds": took,
                "per_s": totals.connected / took,
                "p50_ms": 1000 * percentile(open_times, 50),
                "p99_ms": 1000 * percentile(open_times, 99),
                **cost,
            }
        )
        close_streams(streams)
        await asyncio.sleep(2)  # the server closes them before the next repetition
    return rows


async def reconnect_storm(target: Target, n: int, missed: int, reps: int) -> list[dict[str, Any]]:
    """``n`` clients reconnect at once with Last-Event-ID, each ``missed`` events
    behind: seconds from the first connect until every one has them all.

    ssehub is restarted between publishing and reconnecting, as after a deploy
    (a cold process, the events only in Postgres). Nchan is not: its history is
    in memory and a restart would lose it, so it is measured warm."""
    rows = []
    for rep in range(reps):
        channel = f"storm{rep}"
        anchor = await _anchor(target, channel)
        await target.publish_many(channel, [{"t": 0, "i": i} for i in range(missed)])
        restarted = target.restart()
        totals = Totals()
        meter = Meter(target, totals)
        began = time.time()
        streams = await open_streams(
            HOST,
            target.port,
            [target.stream_path(channel)] * n,
            totals,
            sample_every=0,
            headers={"Last-Event-ID": anchor},
            concurrency=OPEN_CONCURRENCY,
        )
        opened_in = time.time() - began
        caught_up = await _all_caught_up(streams, totals, missed, began + STORM_LIMIT_SECONDS)
        cost = meter.read()
        rows.append(
            {
                "n": n,
                "missed": missed,
                "restarted": restarted,
                "failed": totals.failed,
                "caught_up": caught_up,
                "opened_s": opened_in,
                "seconds": totals.last_event_at - began if caught_up == n else STORM_LIMIT_SECONDS,
                **cost,
            }
        )
        close_streams(streams)
        await asyncio.sleep(2)
    return rows


async def _all_caught_up(
    streams: list[StreamProtocol], totals: Totals, missed: int, deadline: float
) -> int:
    """Wait until every stream has ``missed`` events (or the deadline); how many have."""
    while time.time() < deadline:
        if totals.events >= len(streams) * missed and all(s.events >= missed for s in streams):
            break
        await asyncio.sleep(0.01)
    return sum(1 for s in streams if s.events >= missed)


async def resume(target: Target, missed: int, reps: int) -> list[dict[str, Any]]:
    """One client resumes ``missed`` events behind: seconds from connect to the last."""
    rows = []
    for rep in range(reps):
        channel = f"resume{missed}x{rep}"
        anchor = await _anchor(target, channel)
        await target.publish_many(channel, [{"t": 0, "i": i} for i in range(missed)])
        totals = Totals()
        meter = Meter(target, totals)
        began = time.monotonic()
        streams = await open_streams(
            HOST,
            target.port,
            [target.stream_path(channel)],
            totals,
            sample_every=0,
            headers={"Last-Event-ID": anchor},
        )
        while totals.events < missed and time.monotonic() - began < 30:
            await asyncio.sleep(0.001)
        rows.append(
            {
                "missed": missed,
                "received": totals.events,
                "seconds": time.monotonic() - began,
                **meter.read(),
            }
        )
        close_streams(streams)
    return rows


async def publish_throughput(
    target: Target, seconds: float, batch: int, clients: int
) -> dict[str, Any]:
    """Events per second committed by ``clients`` concurrent keep-alive publishers."""
    channel = "fanout"
    path = target.publish_path(channel) + ("/batch" if batch > 1 else "")
    body = (
        compact_batch(batch)
        if batch > 1
        else target.publish_body(channel, {"i": 1})  # data the size of pgbench's
    )
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        client = target.client()
        try:
            while time.monotonic() < stop_at:
                status, _ = await client.post(path, body)
                if 200 <= status < 300:
                    done += batch
        finally:
            client.close()

    meter = Meter(target)
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return {"per_s": done / (time.monotonic() - started), **meter.read()}


def compact_batch(size: int) -> bytes:
    """A batch whose events carry data like pgbench's rows (``bench.pgbench``)."""
    events = ",".join(f'{{"data":{{"i":{i}}}}}' for i in range(size))
    return f'{{"events":[{events}]}}'.encode()
