"""Attacks on what open streams carry through ``ssehub_control`` notifications.

``NOTIFY`` needs no privilege: any role that can connect to the database may
send a ``ssehub_control`` payload. Here the sender is a real role prepared by
``ssehub grant-publisher`` (it may call ``ssehub_enqueue`` and nothing else)
that forges messages with ``pg_notify``; a real ``ssehub serve`` carries a
victim's streams over real sockets. A forged message must neither add a
channel to a stream nor take one away: streams carry exactly what the tables
say. The same holds without an attacker when a subscription races a member's
removal, and when a revocation lands while a stream is being opened.

Each check that something was *not* delivered waits for a later event on a
channel the stream does carry (a marker): delivery has moved past the point
where the forbidden event would have arrived.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from app.db import asyncpg_dsn
from app.metrics import Metrics
from app.notify import Hints
from app.realtime.access import StreamAccessCache
from app.realtime.broker import PostgresBroker
from app.realtime.control import StreamControl
from app.realtime.hub import Hub
from app.realtime.presence import Presence
from app.realtime.replay import SharedPages
from app.realtime.stream import Stream
from tests.support import Api, Db, Hubs, as_role, run_cli, sql
from tests.support.sse import SseStream

BLOCKED_BY = (
    "SELECT pid, application_name, query FROM pg_stat_activity "
    "WHERE datname = current_database() AND $1 = ANY(pg_blocking_pids(pid))"
)


@pytest.fixture(scope="module")
def forger_url(database_url: str) -> Iterator[str]:
    """A login role granted what ``ssehub grant-publisher`` grants, and nothing else."""
    role = f"ssehub_forger_{uuid.uuid4().hex[:8]}"
    asyncio.run(sql(database_url, f"CREATE ROLE {role} LOGIN"))
    try:
        done = run_cli("grant-publisher", role, database_url=database_url)
        assert done.returncode == 0, done.stderr
        yield as_role(asyncpg_dsn(database_url), role)
    finally:
        asyncio.run(sql(database_url, f"DROP OWNED BY {role}"))
        asyncio.run(sql(database_url, f"DROP ROLE {role}"))


def forge(forger_url: str, *messages: dict[str, Any]) -> None:
    """Send ``messages`` on ``ssehub_control`` as the forger, in one transaction."""
    forger = Db(forger_url)
    try:
        assert not forger.fetch("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")[0][0]
        forger.execute("BEGIN")
        for message in messages:
            forger.fetch("SELECT pg_notify('ssehub_control', $1)", json.dumps(message))
        forger.execute("COMMIT")
    finally:
        forger.close()


def ids_of(database_url: str, table: str, column: str, *names: str) -> list[int]:
    rows = asyncio.run(
        sql(database_url, f"SELECT {column}, id FROM {table} WHERE {column} = ANY($1)", list(names))
    )
    by_name = {row[0]: row[1] for row in rows}
    return [by_name[name] for name in names]


def member_of_vip(api: Api, hubs: Hubs, subscribed: tuple[str, ...]) -> dict[str, str]:
    """Channels vip (private) and pub, and bob, a member of vip subscribed to
    ``subscribed``; bob's headers."""
    hubs.channel("vip", private=True)
    hubs.channel("pub")
    bob = api.user("bob")
    assert api.http.put("/channels/vip/members/bob", headers=hubs.admin).status_code == 204
    for name in subscribed:
        assert api.http.put(f"/me/subscriptions/{name}", headers=bob).status_code == 201
    return bob


def datas(stream: SseStream) -> list[Any]:
    return [frame.json["data"] for frame in stream.events()]


def live(*streams: SseStream) -> None:
    for stream in streams:
        stream.wait_for(lambda s: bool(s.notices("ssehub.live")))


def test_forged_subscribed_adds_a_private_and_a_personal_channel(
    api: Api, hubs: Hubs, database_url: str, forger_url: str
) -> None:
    """The forger tells the server that bob subscribed to a private channel he
    is no member of, to alice's personal channel and to a public channel he
    never subscribed to. Bob's open ``/stream`` must carry none of them."""
    hubs.channel("vip", private=True)
    hubs.channel("pub")
    hubs.channel("other")
    bob = api.user("bob")
    api.user("alice")
    assert api.http.put("/me/subscriptions/pub", headers=bob).status_code == 201
    s = hubs.open("/stream", hubs.stream_token(bob))
    live(s)
    (bob_id,) = ids_of(database_url, "users", "username", "bob")
    channels = ("vip", "@alice", "other")
    channel_ids = ids_of(database_url, "channels", "name", *channels)

    forge(
        forger_url,
        *(
            {"op": "subscribed", "user_id": bob_id, "channel_id": cid, "channel": name}
            for cid, name in zip(channel_ids, channels, strict=True)
        ),
    )
    for name in channels:
        hubs.publish(name, f"secret of {name}")
    marker = hubs.publish("pub", "marker")
    s.wait_for(lambda st: marker in st.ids())
    assert datas(s) == ["marker"], "a forged subscription made the stream carry a channel"
    assert not s.ended


def test_forged_drops_cut_nothing_from_open_streams(
    api: Api, hubs: Hubs, database_url: str, forger_url: str
) -> None:
    """The forger says vip was deleted and made private, that bob unsubscribed
    from pub, that bob was changed (deleted or demoted) and that bob's API key
    was revoked. None of it is true: every stream keeps carrying every channel,
    no ``ssehub.channel_removed`` is told, no stream ends, no event is lost,
    and the key still publishes."""
    bob = member_of_vip(api, hubs, subscribed=("vip", "pub"))
    r = api.http.post("/api-keys", json={"name": "k", "publish": ["pub"]}, headers=hubs.admin)
    assert r.status_code == 201, r.text
    key, key_id = r.json()["key"], r.json()["id"]
    token = hubs.stream_token(bob)
    multi = hubs.open("/stream", token)
    single = hubs.open("/channels/vip/stream", token)
    live(multi, single)
    before = [hubs.publish("vip", "before"), hubs.publish("pub", "before")]
    multi.wait_for(lambda st: st.ids() == before)
    assert api.http.post(
        "/channels/pub/events", json={"data": "by key"}, headers={"Authorization": f"Bearer {key}"}
    ).is_success
    (bob_id,) = ids_of(database_url, "users", "username", "bob")
    vip_id, pub_id = ids_of(database_url, "channels", "name", "vip", "pub")

    forge(
        forger_url,
        {"op": "channel_deleted", "channel_id": vip_id, "channel": "vip"},
        {"op": "access_changed", "channel_id": vip_id, "channel": "vip"},
        {"op": "unsubscribed", "user_id": bob_id, "channel_id": pub_id, "channel": "pub"},
        {"op": "user_changed", "user_id": bob_id},
        {"op": "api_key_revoked", "key_id": key_id},
    )
    after = [hubs.publish("vip", "after"), hubs.publish("pub", "after")]
    by_key = api.http.post(
        "/channels/pub/events", json={"data": "by key"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert by_key.status_code == 201, by_key.text
    marker = hubs.publish("pub", "marker")
    multi.wait_for(lambda st: marker in st.ids())
    single.wait_for(lambda st: after[0] in st.ids())
    every = sorted(before + after + [by_key.json()["id"], marker])
    assert [i for i in multi.ids() if i in every] == every
    assert single.ids() == [before[0], after[0]]
    for s in (multi, single):
        assert not s.notices("ssehub.channel_removed"), "a forged drop was obeyed"
        assert not s.ended


def test_subscribe_racing_a_member_removal_leaves_the_channel_out(
    api: Api, hubs: Hubs, db: Db, database_url: str
) -> None:
    """Bob, a member of vip, subscribes to it; his ``PUT`` has checked his access
    and waits (a lock on subscriptions) to insert, while an admin removes him
    and commits first. Once the subscription commits, bob's open ``/stream``
    must not carry vip."""
    bob = member_of_vip(api, hubs, subscribed=("pub",))
    s = hubs.open("/stream", hubs.stream_token(bob))
    live(s)

    db.execute("BEGIN")
    db.execute("LOCK TABLE subscriptions IN SHARE MODE")  # reads pass, inserts wait
    locker = db.fetch("SELECT pg_backend_pid()")[0][0]
    answer: list[httpx.Response] = []
    put = threading.Thread(
        target=lambda: answer.append(
            httpx.put(f"{api.base_url}/me/subscriptions/vip", headers=bob, timeout=30)
        )
    )
    put.start()
    try:
        blocked = wait_blocked_by(database_url, locker, 1)
        assert "subscriptions" in blocked[0]["query"], blocked
        removed = api.http.delete("/channels/vip/members/bob", headers=hubs.admin)
        assert removed.status_code == 204
    finally:
        db.execute("ROLLBACK")
        put.join(30)
    assert answer and answer[0].status_code == 201, answer

    hubs.publish("vip", "secret")
    marker = hubs.publish("pub", "marker")
    s.wait_for(lambda st: marker in st.ids())
    assert datas(s) == ["marker"], "the removed member's stream carries the channel"


def test_revocation_while_a_stream_opens_is_not_missed(
    api: Api, hubs: Hubs, db: Db, database_url: str
) -> None:
    """Bob, a member of vip, has a ``/stream`` open. An admin removes him; while
    the server re-checks the open streams (held on a lock), bob opens a second
    ``/stream``. Its access was known before the removal: the second stream
    must not carry vip once the re-check is through."""
    bob = member_of_vip(api, hubs, subscribed=("vip", "pub"))
    token = hubs.stream_token(bob)
    first = hubs.open("/stream", token)
    live(first)

    db.execute("BEGIN")
    db.execute("LOCK TABLE subscriptions IN ACCESS EXCLUSIVE MODE")
    locker = db.fetch("SELECT pg_backend_pid()")[0][0]
    opened: list[SseStream] = []
    opener = threading.Thread(target=lambda: opened.append(hubs.open("/stream", token)))
    try:
        assert api.http.delete("/channels/vip/members/bob", headers=hubs.admin).status_code == 204
        blocked = wait_blocked_by(database_url, locker, 1)
        assert blocked[0]["application_name"] == "ssehub-listener", blocked
        opener.start()
        # The open either answers at once (from what the server remembered) or
        # waits on the same lock as the re-check: either way, now let go.
        deadline = time.monotonic() + 10
        while not opened and time.monotonic() < deadline:
            if len(asyncio.run(sql(database_url, BLOCKED_BY, locker))) >= 2:
                break
            time.sleep(0.02)
    finally:
        db.execute("ROLLBACK")
        opener.join(30)
    assert opened, "the second stream did not open"
    second = opened[0]
    live(second)
    first.wait_for(lambda st: bool(st.notices("ssehub.channel_removed")))

    hubs.publish("vip", "secret")
    marker = hubs.publish("pub", "marker")
    for s in (first, second):
        s.wait_for(lambda st: marker in st.ids())
        assert datas(s) == ["marker"], "a stream opened during the revocation carries vip"


def flood_leaves_delivery_going(
    forger_url: str, hubs: Hubs, stream: SseStream, channel: str, statement: str, *args: Any
) -> None:
    """Run ``statement`` as the forger (its messages, one transaction); then an
    event published on ``channel`` must reach ``stream`` within two seconds,
    and the instance stay ready."""
    forger = Db(forger_url)
    try:
        forger.fetch(statement, *args)
    finally:
        forger.close()
    started = time.monotonic()
    first = hubs.publish(channel, "during the flood")
    stream.wait_for(lambda st: first in st.ids(), timeout=30)
    assert time.monotonic() - started < 2.0, "the flood held live delivery back"
    assert httpx.get(f"{hubs.api.base_url}/readyz", timeout=5).status_code == 200


def test_flood_of_forged_notifications_does_not_stall_delivery(
    api: Api, hubs: Hubs, database_url: str, forger_url: str
) -> None:
    """20,000 distinct forged messages in one transaction, each naming the
    channel a stream carries (each one a re-check, if applied one by one), or
    a user that has a stream: live delivery must go on within two seconds."""
    hubs.channel("pub")
    bob = api.user("bob")
    s = hubs.open("/channels/pub/stream", hubs.stream_token(bob))
    live(s)
    (pub_id,) = ids_of(database_url, "channels", "name", "pub")
    (bob_id,) = ids_of(database_url, "users", "username", "bob")
    flood_leaves_delivery_going(
        forger_url,
        hubs,
        s,
        "pub",
        "SELECT pg_notify('ssehub_control', CASE WHEN g % 2 = 0 THEN "
        "json_build_object('op', 'access_changed', 'channel_id', $1::bigint, "
        "'channel', 'pub' || g)::text ELSE json_build_object('op', 'user_changed', "
        "'user_id', $2::bigint, 'n', g)::text END) FROM generate_series(1, 20000) g",
        pub_id,
        bob_id,
    )
    assert not s.ended and not s.notices("ssehub.channel_removed")


def test_forged_presence_messages_tell_no_one_and_stall_nothing(
    api: Api, hubs: Hubs, database_url: str, forger_url: str
) -> None:
    """20,000 forged ``presence_changed`` messages, naming the presence channel a
    stream carries (each a re-read of its list, if applied one by one) or
    others: the stream is told only what the leases say, and live delivery
    goes on within two seconds."""
    hubs.channel("room", presence=True)
    bob = api.user("bob")
    s = hubs.open("/channels/room/stream", hubs.stream_token(bob))
    s.wait_for(lambda st: st.present("room") == ["bob"])
    (room_id,) = ids_of(database_url, "channels", "name", "room")
    flood_leaves_delivery_going(
        forger_url,
        hubs,
        s,
        "room",
        "SELECT pg_notify('ssehub_control', json_build_object('op', 'presence_changed', "
        "'channel_id', CASE WHEN g % 2 = 0 THEN $1::bigint ELSE g END, 'n', g)::text) "
        "FROM generate_series(1, 20000) g",
        room_id,
    )
    ann = api.user("ann")
    hubs.open("/channels/room/stream", hubs.stream_token(ann))
    s.wait_for(lambda st: st.present("room") == ["ann", "bob"])
    assert not s.notices("ssehub.leave")
    assert len(s.notices("ssehub.presence")) == 1, "the list again: a change nobody made"


def wait_blocked_by(database_url: str, locker: int, count: int) -> list[Any]:
    """Until ``count`` backends wait on a lock ``locker`` holds; their rows."""
    deadline = time.monotonic() + 10
    blocked: list[Any] = []
    while time.monotonic() < deadline:
        blocked = asyncio.run(sql(database_url, BLOCKED_BY, locker))
        if len(blocked) >= count:
            return blocked
        time.sleep(0.02)
    raise AssertionError(f"expected {count} backends waiting on the lock: {blocked}")


async def test_answer_read_before_a_revocation_is_rechecked_once_registered(
    database_url: str,
) -> None:
    """The interleaving no lock can hold, driven step by step on the real
    parts: a stream's access is read (bob may read vip), the member removal
    commits and its re-check runs before the stream registers, so it finds no
    stream to revoke. The answer must then be out of date at registration
    (its generation is not the current one: ``app.realtime.routes`` asks for a
    re-check), and the re-check of bob's streams must take vip away."""
    (bob_id,) = await _users(database_url, "bob")
    vip_id = await _channel(database_url, "vip", private=True)
    pub_id = await _channel(database_url, "pub", private=False)
    await sql(
        database_url,
        "INSERT INTO channel_members (channel_id, user_id) VALUES ($1, $2)",
        vip_id,
        bob_id,
    )
    await sql(
        database_url,
        "INSERT INTO subscriptions (user_id, channel_id) VALUES ($1, $2), ($1, $3)",
        bob_id,
        vip_id,
        pub_id,
    )
    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=1, max_size=2)
    try:
        metrics = Metrics()
        hub = Hub(metrics, PostgresBroker(None, metrics), max_streams_per_user=5)
        cache = StreamAccessCache()
        control = StreamControl(hub, cache)
        access, as_of = await cache.get(pool, bob_id, None)
        assert access.channels == {vip_id: "vip", pub_id: "pub"}

        await sql(database_url, "DELETE FROM channel_members WHERE user_id = $1", bob_id)
        removed = Hints()
        assert removed.add({"op": "access_changed", "channel_id": vip_id, "channel": "vip"})
        async with pool.acquire() as conn:
            await control.apply(conn, removed)
        sub = Stream(
            bob_id,
            dict(access.channels),
            True,
            float("inf"),
            None,
            hub=hub,
            replays=SharedPages(pool, hub),
            pool=pool,
            metrics=metrics,
            presence=Presence(pool, hub, metrics, grace=5, ttl=15),
        )
        hub.register(sub)
        assert as_of != cache.generation, "a stale answer looks current at registration"
        again, _ = await cache.get(pool, bob_id, None)
        assert again.channels == {pub_id: "pub"}, "the remembered answer outlived the hint"

        recheck = Hints()
        recheck.recheck_streams_of(bob_id)
        async with pool.acquire() as conn:
            await control.apply(conn, recheck)
        assert sub.channels == {pub_id: "pub"}
        assert not hub.subscribers_of(vip_id)
        assert b'"channel":"vip"' in b"".join(sub.take()[1])
        assert not sub.closed
    finally:
        await pool.close()


async def _users(database_url: str, *names: str) -> list[int]:
    rows = await sql(
        database_url,
        "INSERT INTO users (username, password_hash) SELECT n, 'x' FROM unnest($1::text[]) n "
        "RETURNING id",
        list(names),
    )
    return [row[0] for row in rows]


async def _channel(database_url: str, name: str, private: bool) -> int:
    rows = await sql(
        database_url,
        "INSERT INTO channels (name, private) VALUES ($1, $2) RETURNING id",
        name,
        private,
    )
    channel_id: int = rows[0][0]
    return channel_id
