"""``SSEHUB_BROKER=nats`` on real processes: exactness when NATS fails, interest routing, workers.

One ``nats-server`` and three instances serve the whole module (``cluster``).
Instance A talks to NATS directly; B and C through a TCP proxy of the test's
(``TcpProxy``), which can cut B's connection or stall what flows to C; C's
subscriptions hold at most ``SLOW_PENDING_LIMIT`` messages
(``SSEHUB_NATS_PENDING_LIMIT``), so a burst makes it a slow consumer that
drops messages. Every disruption runs in the middle of the chaos run of
``tests.support.chaos`` and must cost nothing: each reader ends with exactly its
channels' history. ``ssehub_broker_events_total{source="log"}`` growing on the
disrupted instance shows the gap was noticed and read from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    NATS_SERVER,
    Api,
    Db,
    Hubs,
    NatsServer,
    Server,
    TcpProxy,
    broker_events,
    metric,
    migrated_database,
    sql,
    wait_until,
)
from tests.support.chaos import run_chaos
from tests.support.sse import SseStream

SLOW_PENDING_LIMIT = 50
LOOKS = "ssehub_nats_safety_net_looks_total"

pytestmark = pytest.mark.skipif(
    not Path(NATS_SERVER).exists(), reason="nats-server is not installed (.ci/run installs it)"
)


class Cluster:
    def __init__(self, nats: NatsServer, database_url: str) -> None:
        self.nats = nats
        self.proxy_b, self.proxy_c = TcpProxy(nats.port), TcpProxy(nats.port)
        env = {"SSEHUB_BROKER": "nats", "SSEHUB_ACCESS_LOG": "false"}
        self.a = Server(database_url, env={**env, "SSEHUB_NATS_URL": nats.url})
        self.b = Server(database_url, env={**env, "SSEHUB_NATS_URL": self.proxy_b.url})
        self.c = Server(
            database_url,
            env={
                **env,
                "SSEHUB_NATS_URL": self.proxy_c.url,
                "SSEHUB_NATS_PENDING_LIMIT": str(SLOW_PENDING_LIMIT),
            },
        )
        self.servers = (self.a, self.b, self.c)

    @property
    def bases(self) -> list[str]:
        return [s.url for s in self.servers]

    def counts(self) -> list[dict[str, float]]:
        return [broker_events(base) for base in self.bases]


def _grown(before: list[dict[str, float]], after: list[dict[str, float]], source: str) -> list[int]:
    return [int(b[source] - a[source]) for a, b in zip(before, after, strict=True)]


@pytest.fixture(scope="module")
def cluster(nats_server: NatsServer, database_url: str) -> Iterator[Cluster]:
    c = Cluster(nats_server, database_url)
    try:
        with ThreadPoolExecutor(3) as pool:  # together: each takes seconds to start
            for started in [pool.submit(srv.start) for srv in c.servers]:
                started.result()
        yield c
    finally:
        for srv in c.servers:
            srv.stop()
        c.proxy_b.close()
        c.proxy_c.close()


@pytest.fixture
def hubs(cluster: Cluster) -> Iterator[Hubs]:
    h = Hubs(Api(cluster.a.url))
    yield h
    h.close_all()
    h.api.http.close()


def _readers(hubs: Hubs) -> list[dict[str, str]]:
    """Two ``/stream`` readers: one subscribed to two channels, one to three."""
    return [hubs.api.user(f"reader{i}") for i in range(2)]


def _chaos(
    cluster: Cluster,
    hubs: Hubs,
    users: list[dict[str, str]],
    tag: str,
    during: Callable[[], None] | None = None,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """One chaos run on the three instances; returns the events each received
    over NATS and read from the log meanwhile."""
    before = cluster.counts()
    run = run_chaos(hubs, cluster.bases, users, tag=tag, seconds=2.5, during=during, seed=seed)
    after = cluster.counts()
    nats, log = _grown(before, after, "nats"), _grown(before, after, "log")
    print(f"{tag}: {run}; over NATS {nats}, from the log {log}")
    return nats, log


def test_chaos_ten_times_on_three_instances(cluster: Cluster, hubs: Hubs) -> None:
    """The streams suite's chaos run, ten times on the same three instances: every
    reader ends with exactly its channels' history, and NATS carried events
    to every instance (the log alone would pass too)."""
    users = _readers(hubs)
    for i in range(10):
        nats, _log = _chaos(cluster, hubs, users, f"run{i}", seed=i)
        assert all(nats), f"run {i}: an instance received nothing over NATS ({nats})"


def _reconnects(srv: Server) -> int:
    return srv.log().count("nats: reconnected")


def test_nats_server_restarted_mid_run(cluster: Cluster, hubs: Hubs) -> None:
    """nats-server stopped while everything runs, and started again on its port
    once every instance has delivered from the log meanwhile (the safety net,
    which reads on its second look behind: about 4 s); then every instance
    reconnects; what NATS lost, the log fills."""
    reconnects = [_reconnects(srv) for srv in cluster.servers]

    def restart() -> None:
        before = cluster.counts()
        cluster.nats.stop()
        wait_until(
            lambda: all(_grown(before, cluster.counts(), "log")),
            "every instance to deliver from the log while NATS is away",
            timeout=15,
        )
        cluster.nats.start()

    _nats, log = _chaos(cluster, hubs, _readers(hubs), "restart", during=restart)
    wait_until(
        lambda: all(_reconnects(s) > n for s, n in zip(cluster.servers, reconnects, strict=True))
    )
    assert all(log), f"an instance filled nothing from the log ({log})"


def test_one_instance_cut_from_nats_mid_run(cluster: Cluster, hubs: Hubs) -> None:
    """B's connection to NATS cut, and refused for a second: B misses what the
    others send meanwhile, and they miss what B sends; the log fills both."""
    connections, reconnects = cluster.proxy_b.connections, _reconnects(cluster.b)
    _nats, log = _chaos(
        cluster, hubs, _readers(hubs), "cut", during=lambda: cluster.proxy_b.cut(refuse_for=1.0)
    )
    wait_until(lambda: _reconnects(cluster.b) > reconnects)
    assert cluster.proxy_b.connections > connections
    assert log[1] > 0, "B did not fill its gap from the log"


def test_slow_nats_consumer_drops_and_the_log_fills(cluster: Cluster, hubs: Hubs) -> None:
    """What NATS sends C is held back, then arrives in one burst: more than C's
    subscriptions may hold (``SLOW_PENDING_LIMIT``), so the NATS client drops
    the rest as a slow consumer's, and C reads them from the log."""
    held: list[int] = []
    dropped = cluster.c.log().count("slow consumer")
    _nats, log = _chaos(
        cluster,
        hubs,
        _readers(hubs),
        "slow",
        during=lambda: held.append(cluster.proxy_c.stall(until_bytes=24_000, timeout=2.0)),
    )
    dropped = cluster.c.log().count("slow consumer") - dropped
    print(f"slow: {held[0]} bytes held back from C, {dropped} messages dropped")
    assert dropped > 0, "C's subscriptions never overflowed"
    assert log[2] > 0, "C did not fill its gap from the log"


def test_interest_routing(cluster: Cluster, hubs: Hubs, database_url: str) -> None:
    """An instance whose only stream carries channel a receives a's events over
    NATS and none of b's, over NATS or from the log; the two instances with
    no stream receive nothing at all."""
    hubs.channel("a")
    hubs.channel("b")
    ids = {r["name"]: r["id"] for r in _channel_ids(database_url)}
    on_a = hubs.open("/channels/a/stream", hubs.stream_token(hubs.admin), base=cluster.a.url)
    on_a.wait_for(lambda s: bool(s.notices("ssehub.live")))
    wait_until(lambda: _subscribed(cluster.nats, ids["a"]))

    before = cluster.counts()
    b_ids = [hubs.publish("b", i, base=cluster.bases[1 + i % 2]) for i in range(20)]
    r = httpx.post(
        f"{cluster.b.url}/channels/b/events/batch",
        json={"events": [{"data": i} for i in range(10)]},
        headers=hubs.admin,
    )
    assert r.status_code == 201, r.text
    marker = hubs.publish("a", "marker", base=cluster.b.url)
    assert on_a.wait_ids(1) == [marker]  # A has applied every transaction of b before it
    # The safety net must read nothing of b either, here or on B and C: it reads
    # when behind on two looks running, so every instance looks twice more.
    looks = [metric(base, LOOKS) for base in cluster.bases]
    wait_until(
        lambda: all(metric(b, LOOKS) >= n + 2 for b, n in zip(cluster.bases, looks, strict=True)),
        "two safety-net looks on every instance",
    )
    middle = cluster.counts()
    assert _grown(before, middle, "nats") == [1, 0, 0], "b's events reached an instance"
    assert _grown(before, middle, "log") == [0, 0, 0]
    assert b_ids and not _subscribed(cluster.nats, ids["b"])

    a_ids = [hubs.publish("a", i, base=cluster.bases[1 + i % 2]) for i in range(20)]
    assert on_a.wait_ids(21) == [marker, *a_ids]
    after = cluster.counts()
    assert _grown(middle, after, "nats") == [20, 0, 0]
    assert _grown(middle, after, "log") == [0, 0, 0]


def test_a_stream_opened_during_a_log_read_gets_what_the_read_passes(
    cluster: Cluster, hubs: Hubs, db: Db, database_url: str
) -> None:
    """B, cut from NATS, fills its gap from the log on the listener's turn, for the
    channels it carries (w). While that read waits (the test holds a lock on
    ``channels``), a stream opens on B on channel x, carried by nothing on B
    until then, at B's position. The read passes x's event too: the broker must
    ask what is carried again before it moves its position past that event."""
    hubs.channel("w")
    hubs.channel("x")
    x = next(r["id"] for r in _channel_ids(database_url) if r["name"] == "x")
    token = hubs.stream_token(hubs.admin)
    on_w = hubs.open("/channels/w/stream", token, base=cluster.b.url)
    on_w.wait_for(lambda s: bool(s.notices("ssehub.live")))
    # B answers x's access once; the second open below then needs no query.
    first = hubs.open("/channels/x/stream", token, base=cluster.b.url)
    first.wait_for(lambda s: bool(s.notices("ssehub.live")))
    wait_until(lambda: _subscribed(cluster.nats, x))
    first.close()
    wait_until(lambda: not _subscribed(cluster.nats, x))  # nothing on B carries x now
    before = hubs.publish("w", "before", base=cluster.a.url)
    assert on_w.wait_ids(1) == [before]  # B's position

    reconnects = _reconnects(cluster.b)
    cluster.proxy_b.cut(refuse_for=6.0)
    wait_until(lambda: "nats: disconnected" in cluster.b.log())
    w_event = hubs.publish("w", "w", base=cluster.a.url)
    x_event = hubs.publish("x", "x", base=cluster.a.url)
    db.execute("BEGIN")
    db.execute("LOCK TABLE channels IN ACCESS EXCLUSIVE MODE")
    try:
        wait_until(lambda: _waiting_log_reads(database_url) > 0, timeout=15)
        second = hubs.open(f"/channels/x/stream?last_event_id={before}", token, base=cluster.b.url)
        second.wait_for(lambda s: bool(s.notices("ssehub.live")))
    finally:
        db.execute("ROLLBACK")
    assert on_w.wait_ids(2) == [before, w_event]
    assert second.wait_ids(1) == [x_event], "the event of x that B's read passed was lost"
    wait_until(lambda: _reconnects(cluster.b) > reconnects, timeout=20)


def _waiting_log_reads(database_url: str) -> int:
    """Reads of the log's pages (``app.events.log``) waiting for a lock."""
    rows = asyncio.run(
        sql(
            database_url,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%JOIN public.channels c ON c.id = p.channel_id%'",
        )
    )
    return int(rows[0]["n"])


def test_two_deployments_on_one_nats_server_stay_apart(
    nats_server: NatsServer,
    cluster: Cluster,
    hubs: Hubs,
    database_url: str,
    postgres_server_url: str,
) -> None:
    """Another deployment (its own database; the same signing key, as every
    server of these tests has) on the same NATS server, with a channel of the
    same name and the same id: each stream gets exactly its own deployment's
    events, all of them, although both publish at once."""
    hubs.channel("shared")
    with migrated_database(postgres_server_url, "ssehub_other") as url:
        env = {"SSEHUB_BROKER": "nats", "SSEHUB_NATS_URL": nats_server.url}
        other = Server(url, env=env).start()
        theirs = Hubs(Api(other.url))
        try:
            _same_channel_id(database_url, theirs, url)
            streams = [
                h.open("/channels/shared/stream", h.stream_token(h.admin), base=base)
                for h, base in ((hubs, cluster.a.url), (theirs, other.url))
            ]
            for s in streams:
                s.wait_for(lambda st: bool(st.notices("ssehub.live")))
            published: list[list[int]] = [[], []]
            for i in range(20):
                published[0].append(hubs.publish("shared", i, base=cluster.bases[i % 3]))
                published[1].append(theirs.publish("shared", i))
            for s, ids in zip(streams, published, strict=True):
                assert s.wait_ids(len(ids)) == ids
            # Nothing of the other deployment's arrives late either. No marker can
            # show that: a stream gets only its own deployment's events, whose
            # order says nothing about the other's. Wait a moment out.
            time.sleep(1)
            for s, ids in zip(streams, published, strict=True):
                assert s.ids() == ids
        finally:
            theirs.close_all()
            theirs.api.http.close()
            other.stop()


def test_readyz_reports_nats_going_away_and_coming_back(database_url: str) -> None:
    """nats-server stopped under a running instance: ``/readyz`` says the broker
    is not ready (503) while it is away, and ready again once it is back."""
    nats = NatsServer().start()
    env = {"SSEHUB_BROKER": "nats", "SSEHUB_NATS_URL": nats.url}
    srv = Server(database_url, env=env).start()

    def broker_ready() -> bool:
        r = httpx.get(f"{srv.url}/readyz", timeout=5)
        return r.status_code == 200 and r.json()["broker"] is True

    try:
        wait_until(broker_ready, "the broker ready")
        nats.stop()
        wait_until(lambda: not broker_ready(), "the broker not ready")
        assert httpx.get(f"{srv.url}/readyz", timeout=5).json()["database"] is True
        nats.start()
        wait_until(broker_ready, "the broker ready again")
    finally:
        srv.stop()
        nats.stop()


def _same_channel_id(database_url: str, theirs: Hubs, other_url: str) -> None:
    """Their channel ``shared`` gets the id ours has: the same subject, were
    subjects not kept apart."""
    ours = next(r["id"] for r in _channel_ids(database_url) if r["name"] == "shared")
    query = "SELECT setval(pg_get_serial_sequence('channels', 'id'), $1, false)"
    asyncio.run(sql(other_url, query, ours))
    theirs.channel("shared")
    assert [r["id"] for r in _channel_ids(other_url) if r["name"] == "shared"] == [ours]


def _subscribed(nats: NatsServer, channel_id: int) -> bool:
    """Whether any connection follows the channel's subject (``ssehub.<ns>.ev.<id>``)."""
    return any(s.endswith(f".ev.{channel_id}") for subs in nats.subscriptions() for s in subs)


def _channel_ids(database_url: str) -> list[Any]:
    return asyncio.run(sql(database_url, "SELECT name, id FROM channels"))


# -- ssehub serve --workers N ---------------------------------------------------


def _workers(pid: int) -> list[int]:
    """The worker processes uvicorn spawned (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(p) for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink().name
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _worker_of(streams: list[SseStream], port: int, workers: list[int]) -> list[int]:
    """Which worker process holds the server side of each stream's connection."""
    by_peer: dict[int, int] = {}  # client port -> socket inode, server side of `port`
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == port and inode:
            by_peer[int(remote.split(":")[1], 16)] = inode
    owners = {inode: pid for pid in workers for inode in _socket_inodes(pid)}
    return [owners.get(by_peer.get(s.local_port, -1), 0) for s in streams]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("broker", ["postgres", "nats"])
def test_workers_fan_out_and_stop_together(
    start_server: Callable[..., Server], nats_server: NatsServer, broker: str
) -> None:
    """``--workers 3``: three processes on one port, each a full instance with its
    own per-user stream limit; an event published through the port reaches the
    streams of every worker; SIGTERM ends all of them, and their streams, in 5 s."""
    per_user = 4
    env = {"SSEHUB_MAX_STREAMS_PER_USER": str(per_user)}
    if broker == "nats":
        env |= {"SSEHUB_BROKER": "nats", "SSEHUB_NATS_URL": nats_server.url}
    srv = start_server(workers=3, **env)
    assert srv.process is not None
    parent = srv.process.pid
    hubs = Hubs(Api(srv.url))
    hubs.channel("news")
    token = hubs.stream_token(hubs.admin)
    wait_until(lambda: len(_workers(parent)) == 3)
    workers = _workers(parent)

    # One user opens streams until every worker holds its limit: each connection
    # lands on whichever worker accepts it, and is refused (429) by a full one.
    streams: list[SseStream] = []
    for _ in range(200):
        if len(streams) == per_user * 3:
            break
        s = hubs.open("/channels/news/stream", token)
        if s.status == 429:
            s.close()
            continue
        s.wait_for(lambda st: bool(st.notices("ssehub.live")))
        streams.append(s)
    owners = _worker_of(streams, srv.port, workers)
    assert sorted(owners.count(w) for w in workers) == [per_user] * 3, owners
    extra = hubs.open("/channels/news/stream", token)  # every worker is full now
    assert extra.status == 429

    ids = [hubs.publish("news", i) for i in range(10)]  # each on whichever worker takes it
    for s in streams:
        assert s.wait_ids(10) == ids

    took = srv.stop()
    assert took < 5, took
    for s in streams:
        s.wait_for(lambda st: st.ended, timeout=2)
    assert not [pid for pid in workers if _alive(pid)]
    hubs.close_all()
