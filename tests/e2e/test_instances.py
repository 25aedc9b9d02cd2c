"""Several instances, failures and load: the guarantee when things go wrong.

Each test runs real ``ssehub serve`` processes on one database and checks
what readers received: every published id of their channels, once, in order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx

from tests.support import Api, Hubs, sql, wait_until
from tests.support.chaos import run_chaos


def test_event_published_on_one_instance_reaches_another(start_server) -> None:
    a, b = start_server(), start_server()
    hubs = Hubs(Api(a.url))
    hubs.channel("news")
    token = hubs.stream_token(hubs.admin)
    on_b = hubs.open("/channels/news/stream", token, base=b.url)
    on_b.wait_for(lambda s: bool(s.notices("ssehub.live")))
    ids = [hubs.publish("news", i, base=(a.url if i % 2 else b.url)) for i in range(20)]
    try:
        assert on_b.wait_ids(20) == ids
    finally:
        hubs.close_all()


def test_listener_killed_mid_run_misses_nothing(start_server, database_url: str) -> None:
    srv = start_server()
    hubs = Hubs(Api(srv.url))
    hubs.channel("news")
    s = hubs.open("/channels/news/stream", hubs.stream_token(hubs.admin))
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    published: list[int] = []
    stop = threading.Event()

    def publish() -> None:
        while not stop.is_set():
            published.append(hubs.publish("news", len(published)))

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        wait_until(lambda: len(published) >= 3, "publishing to be under way")
        killed = asyncio.run(
            sql(
                database_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'ssehub-listener' AND datname = current_database()",
            )
        )
        assert killed, "no listener connection found"
        saw_unready = False

        def loss_noticed() -> bool:
            nonlocal saw_unready
            saw_unready = saw_unready or httpx.get(f"{srv.url}/readyz").status_code == 503
            return saw_unready or "listener: connection lost" in srv.log()

        wait_until(loss_noticed, "the listener's loss noticed")
        wait_until(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200, "ready again")
    finally:
        stop.set()
        publisher.join()
    assert s.wait_ids(len(published)) == published


def test_sigterm_with_50_open_streams_exits_within_5_seconds(start_server) -> None:
    srv = start_server()
    hubs = Hubs(Api(srv.url))
    hubs.channel("news")
    users = [hubs.api.user(f"user{i}") for i in range(10)]
    streams = [
        hubs.open("/channels/news/stream", hubs.stream_token(users[i % 10])) for i in range(50)
    ]
    for s in streams:
        s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    took = srv.stop()
    assert took < 5, took
    assert srv.process is not None and srv.process.returncode is not None
    for s in streams:
        s.wait_for(lambda st: st.ended, timeout=2)
    hubs.close_all()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_reader_bounded_memory_and_catches_up(start_server) -> None:
    srv = start_server()
    hubs = Hubs(Api(srv.url))
    hubs.channel("big")
    token = hubs.stream_token(hubs.admin)
    slow = hubs.open("/channels/big/stream", token, rcvbuf=4096)
    fast = hubs.open("/channels/big/stream", token)
    for s in (slow, fast):
        s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    slow.paused.set()
    assert srv.process is not None
    rss_before = _rss_kib(srv.process.pid)
    payload = "x" * 20_000
    ids: list[int] = []
    for _ in range(15):  # 15 batches x 100 events x 20 kB = 30 MB through the server
        r = httpx.post(
            f"{srv.url}/channels/big/events/batch",
            json={"events": [{"data": payload} for _ in range(100)]},
            headers=hubs.admin,
            timeout=30,
        )
        assert r.status_code == 201, r.text
        ids += [e["id"] for e in r.json()["events"]]
    assert fast.wait_ids(len(ids), timeout=30) == ids  # the slow one delays nobody
    grown_mib = (_rss_kib(srv.process.pid) - rss_before) / 1024
    assert grown_mib < 50, f"server grew by {grown_mib:.0f} MiB for a stalled reader"
    slow.paused.clear()
    # Reading again, it either catches up on the same connection (from the log)
    # or, if it stalled past the send timeout, was let go and resumes like any client.
    slow.wait_for(lambda s: len(s.ids()) >= len(ids) or s.ended, timeout=30)
    got = slow.ids()
    if len(got) < len(ids):
        resumed = hubs.open("/channels/big/stream", token, headers={"Last-Event-ID": str(got[-1])})
        got += resumed.wait_ids(len(ids) - len(got), timeout=30)
    assert got == ids
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert (
        "ssehub_slow_reader_catchups_total 0.0" not in metrics
        or "ssehub_slow_reader_disconnects_total 0.0" not in metrics
    )
    hubs.close_all()


def test_chaos_readers_drop_and_resume_across_instances(start_server) -> None:
    """Concurrent publishers on both instances; readers of one channel and of
    ``/stream`` (two or three subscribed channels) that disconnect at random and
    resume with their last id on either instance: each ends with exactly the
    history of its channels, once each, in increasing order (``tests.support.chaos``)."""
    a, b = start_server(), start_server()
    hubs = Hubs(Api(a.url))
    users = [hubs.api.user(f"reader{i}") for i in range(3)]
    run = run_chaos(hubs, [a.url, b.url], users, tag="pg", seconds=4)
    print(run)
    assert run.events > 100


def test_channel_removed_reaches_streams_on_another_instance(start_server) -> None:
    a, b = start_server(), start_server()
    hubs = Hubs(Api(a.url))
    hubs.channel("vip", private=True)
    bob = hubs.api.user("bob")
    hubs.api.http.put("/channels/vip/members/bob", headers=hubs.admin)
    on_b = hubs.open("/channels/vip/stream", hubs.stream_token(bob), base=b.url)
    on_b.wait_for(lambda s: bool(s.notices("ssehub.live")))
    started = time.monotonic()
    assert hubs.api.http.delete("/channels/vip/members/bob", headers=hubs.admin).status_code == 204
    on_b.wait_for(lambda s: s.ended, timeout=2)
    assert time.monotonic() - started < 1.0
    assert on_b.notices("ssehub.channel_removed")[0].json == {"channel": "vip"}
    hubs.close_all()
