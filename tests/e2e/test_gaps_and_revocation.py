"""Attacks on the stream guarantees where the log moves under a stream.

"A stream never skips ids silently" and "a revocation applies within 1 s, also
to a replay in progress, and survives a lost listener connection" (API.md,
Streams). Each test runs a real ``ssehub serve`` on a real Postgres, reads
over a raw socket, and changes the database behind the server's back exactly
as retention or another instance would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import Api, Db, Hubs, Server, sql, wait_until
from tests.support.sse import SseStream

# A history far larger than what sockets and one replay page can hold, so a
# paused reader leaves the server blocked in the middle of its replay.
HISTORY_EVENTS = 4000
EVENT_BYTES = 10_000
PAGE_BYTES = 1024 * 1024  # app.events.log.PAGE_BYTES: what one replay page holds
# Each call one request (no keys), waiting up to 5 s for the publish lock.
PUBLISH = (
    "SELECT row_number, status, event_id FROM ssehub_publish_as("
    "$1::bigint[], array_fill(NULL::bigint, ARRAY[cardinality($1::bigint[])]), "
    "$2::text[], $3::text[], $4::text[], $5::text[], "
    "array_fill(1, ARRAY[cardinality($1::bigint[])]), 5000) ORDER BY row_number"
)
PUBLISH_MANY = (
    "SELECT status, event_id FROM ssehub_publish_as("
    "array_fill((SELECT id FROM users WHERE username = 'admin'), ARRAY[$2::int]), "
    "array_fill(NULL::bigint, ARRAY[$2::int]), array_fill($1::text, ARRAY[$2::int]), array_fill('message'::text, ARRAY[$2::int]), "
    "array_fill($3::text, ARRAY[$2::int]), array_fill(NULL::text, ARRAY[$2::int]), "
    "array_fill(1, ARRAY[$2::int]), 5000) "
    "ORDER BY row_number"
)
# What retention does (app.events.retention): delete oldest first, and raise
# pruned_through to the highest id removed, in one transaction.
PRUNE_THROUGH = """
WITH doomed AS (
    DELETE FROM events
    WHERE channel_id = (SELECT id FROM channels WHERE name = $1) AND id <= $2
    RETURNING id
)
UPDATE channels SET pruned_through = greatest(pruned_through, (SELECT max(id) FROM doomed))
WHERE name = $1
"""
KILL_LISTENER = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE application_name = 'ssehub-listener' AND datname = current_database()"
)


def publish_many(database_url: str, channel: str, count: int = HISTORY_EVENTS) -> list[int]:
    """``count`` events of about ``EVENT_BYTES`` on ``channel`` in one publish,
    through the publish function, as the admin; their ids."""
    data = json.dumps("x" * (EVENT_BYTES - 2))
    rows = asyncio.run(sql(database_url, PUBLISH_MANY, channel, count, data))
    assert [r["status"] for r in rows] == ["created"] * count
    return [r["event_id"] for r in rows]


def until_the_instance_has(hubs: Hubs, channel: str, last_id: int) -> None:
    """``publish_many`` writes behind the server's back (no writer, so no NATS
    message): with ``SSEHUB_BROKER=nats`` an instance learns of those events on
    its safety net's turn, a second or two later. Wait for that, so that the
    stream under test replays them rather than receives them live. (With the
    admin's access token: a stream token of a test's short TTL may not last.)"""
    access_token = hubs.admin["Authorization"].removeprefix("Bearer ")
    probe = hubs.open(f"/channels/{channel}/stream?last_event_id={last_id - 1}", access_token)
    try:
        assert probe.wait_ids(1, timeout=15) == [last_id]
    finally:
        probe.close()


def assert_no_silent_skips(stream: SseStream, published: dict[str, list[int]]) -> None:
    """Walk the stream's frames in order: ids only increase, every event is one
    that was published, and per channel each event is the next one published
    after the previous one delivered (the first one published, for the first)
    unless a ``ssehub.truncated`` for that channel came in between, naming
    this event as the oldest retained."""
    position = {
        ch: {event_id: n for n, event_id in enumerate(ids)} for ch, ids in published.items()
    }
    expected = dict.fromkeys(published, 0)
    told: dict[str, int] = {}
    last = 0
    for frame in list(stream.frames):
        if frame.comment:
            continue
        if frame.id is None:
            if frame.event == "ssehub.truncated":
                told[frame.json["channel"]] = frame.json["oldest_id"]
            continue
        assert frame.id > last, f"id {frame.id} after {last}: duplicate or out of order"
        last = frame.id
        channel = frame.json["channel"]
        assert frame.id in position.get(channel, {}), f"{channel} {frame.id} was not published"
        n = position[channel][frame.id]
        if n != expected[channel]:
            missing = published[channel][expected[channel] : n]
            assert told.get(channel) == frame.id, (
                f"{channel}: {len(missing)} ids skipped silently "
                f"({missing[0]}..{missing[-1]}) before {frame.id}"
            )
        told.pop(channel, None)
        expected[channel] = n + 1


def wait_server_blocked(stream: SseStream, timeout: float = 10) -> None:
    """Until the reader has paused and the server's send buffer to it has less room
    than a replay page: the server then waits in a write, in the middle of its
    replay (or will at its next page: it writes a page at a time)."""
    stream.wait_for(lambda s: s.paused.is_set(), timeout)
    wait_until(
        lambda: stream.server_send_room() < PAGE_BYTES,
        "the server to block writing to the paused reader",
        timeout,
    )


def buffered_events_bound() -> int:
    """The most events a server may have handed to the kernel and to its
    transport before it next looks at the stream: a full socket send buffer,
    the page being written, and slack for what the reader took before pausing."""
    send_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    bound = (send_max + 2 * PAGE_BYTES + 256 * 1024) // EVENT_BYTES
    assert bound < HISTORY_EVENTS // 2, "socket buffers too big for this history to mean anything"
    return bound


def last_notice(stream: SseStream) -> str:
    """The type of the last server notice on the stream ("" if none)."""
    return stream.notices()[-1].event if stream.notices() else ""


def test_retention_prunes_before_the_broker_reads(api: Api, hubs: Hubs, db: Db) -> None:
    """Events are published and pruned in one transaction, so the broker's tail
    never sees the first three: the live streams must say ``ssehub.truncated``
    before the first survivor, and a ``/stream`` interleaving another channel
    keeps its ids in order."""
    hubs.channel("c")
    hubs.channel("d")
    for name in ("c", "d"):
        assert api.http.put(f"/me/subscriptions/{name}", headers=hubs.admin).status_code == 201
    token = hubs.stream_token(hubs.admin)
    single = hubs.open("/channels/c/stream", token)
    multi = hubs.open("/stream", token)
    for s in (single, multi):
        s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    admin_id = db.fetch("SELECT id FROM users WHERE username = 'admin'")[0][0]
    channels = ["c", "d", "c", "d", "c", "d", "c", "c"]
    db.execute("BEGIN")
    rows = db.fetch(
        PUBLISH,
        [admin_id] * len(channels),
        channels,
        ["message"] * len(channels),
        [json.dumps(n) for n in range(len(channels))],
        [None] * len(channels),
    )
    assert [r["status"] for r in rows] == ["created"] * len(channels)
    ids = {
        ch: [r["event_id"] for r, c in zip(rows, channels, strict=True) if c == ch] for ch in "cd"
    }
    assert len(ids["c"]) == 5
    db.fetch(PRUNE_THROUGH, "c", ids["c"][2])
    db.execute("COMMIT")

    single.wait_ids(2)
    multi.wait_ids(5)
    assert_no_silent_skips(single, {"c": ids["c"]})
    assert_no_silent_skips(multi, ids)
    truncated = {"channel": "c", "oldest_id": ids["c"][3]}
    assert [n.json for n in single.notices("ssehub.truncated")] == [truncated]
    assert [n.json for n in multi.notices("ssehub.truncated")] == [truncated]
    assert single.ids() == ids["c"][3:]
    assert multi.ids() == sorted(ids["d"] + ids["c"][3:])


def test_retention_prunes_during_a_slow_replay(api: Api, hubs: Hubs, database_url: str) -> None:
    """A resume from 0 over 40 MB whose reader stops after a few events: the
    server is blocked mid-replay when retention removes the events it was about
    to read. The replay must say ``ssehub.truncated`` before the first event
    after the gap, and go on to the end."""
    hubs.channel("c")
    ids = publish_many(database_url, "c")
    until_the_instance_has(hubs, "c", ids[-1])
    s = hubs.open(
        "/channels/c/stream?last_event_id=0",
        hubs.stream_token(hubs.admin),
        rcvbuf=4096,
        pause_after=3,
    )
    wait_server_blocked(s)
    assert len(s.ids()) < 100, "the reader did not stop early"
    first_kept = 3500
    asyncio.run(sql(database_url, PRUNE_THROUGH, "c", ids[first_kept - 1]))
    s.paused.clear()
    s.wait_for(lambda st: bool(st.notices("ssehub.live")), timeout=30)
    assert_no_silent_skips(s, {"c": ids})
    assert s.notices("ssehub.truncated")[0].json == {"channel": "c", "oldest_id": ids[first_kept]}
    assert s.ids()[-(len(ids) - first_kept) :] == ids[first_kept:]


def test_resume_position_above_every_issued_id(api: Api, hubs: Hubs) -> None:
    """A client resuming from a position this database never issued (a restore
    from backup): without ``ssehub.reset`` every live event would be dropped as
    already seen, forever."""
    hubs.channel("c")
    token = hubs.stream_token(hubs.admin)
    watcher = hubs.open("/channels/c/stream", token)
    watcher.wait_for(lambda st: bool(st.notices("ssehub.live")))
    delivered = hubs.publish("c", "before")
    watcher.wait_ids(1)  # the server has delivered up to ``delivered``
    s = hubs.open("/channels/c/stream", token, headers={"Last-Event-ID": str(10**15)})
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    later = hubs.publish("c", "after")
    assert s.wait_ids(1, timeout=5) == [later]
    kinds = [f.event for f in s.frames if f.id is not None or f.event.startswith("ssehub.")]
    assert kinds == ["ssehub.reset", "ssehub.live", "message"]
    assert s.notices("ssehub.reset")[0].json == {"last_event_id": delivered}


def test_revocation_lost_with_the_listener_connection(
    api: Api, hubs: Hubs, database_url: str
) -> None:
    """Access and subscriptions change while the listener is cut, so no control
    message ever reaches this instance: the resync after it reconnects must
    revoke the private channel, drop the removed subscription and carry the new
    one."""
    hubs.channel("vip", private=True)
    hubs.channel("gone")
    hubs.channel("new")
    bob = api.user("bob")
    assert api.http.put("/channels/vip/members/bob", headers=hubs.admin).status_code == 204
    for name in ("vip", "gone"):
        assert api.http.put(f"/me/subscriptions/{name}", headers=bob).status_code == 201
    token = hubs.stream_token(bob)
    single = hubs.open("/channels/vip/stream", token)
    multi = hubs.open("/stream", token)
    for s in (single, multi):
        s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    before = hubs.publish("vip", "before")
    for s in (single, multi):
        assert s.wait_ids(1) == [before]

    bob_id = "(SELECT id FROM users WHERE username = 'bob')"
    asyncio.run(
        sql(
            database_url,
            f"""WITH m AS (
                DELETE FROM channel_members WHERE user_id = {bob_id}
                AND channel_id = (SELECT id FROM channels WHERE name = 'vip')
            ), s AS (
                DELETE FROM subscriptions WHERE user_id = {bob_id}
                AND channel_id = (SELECT id FROM channels WHERE name = 'gone')
            )
            INSERT INTO subscriptions (user_id, channel_id)
            SELECT {bob_id}, id FROM channels WHERE name = 'new'""",
        )
    )
    assert any(r[0] for r in asyncio.run(sql(database_url, KILL_LISTENER)))
    cut = time.monotonic()
    single.wait_for(lambda st: st.ended, timeout=5)
    multi.wait_for(lambda st: bool(st.notices("ssehub.channel_removed")), timeout=5)
    assert time.monotonic() - cut < 2.5
    assert [n.json for n in single.notices("ssehub.channel_removed")] == [{"channel": "vip"}]
    assert [n.json for n in multi.notices("ssehub.channel_removed")] == [{"channel": "vip"}]

    hubs.publish("vip", "revoked")
    hubs.publish("gone", "unsubscribed")
    carried = hubs.publish("new", "subscribed")
    assert multi.wait_ids(2) == [before, carried]
    assert single.ids() == [before]
    assert not multi.ended


def test_revocation_during_a_replay_in_progress(api: Api, hubs: Hubs, database_url: str) -> None:
    """A member resumes 40 MB of a private channel and reads slowly; removed
    meanwhile, the server must stop writing the channel within a second, not
    after handing over the whole history it may no longer read."""
    hubs.channel("vip", private=True)
    bob = api.user("bob")
    assert api.http.put("/channels/vip/members/bob", headers=hubs.admin).status_code == 204
    ids = publish_many(database_url, "vip")
    until_the_instance_has(hubs, "vip", ids[-1])
    s = hubs.open(
        "/channels/vip/stream?last_event_id=0", hubs.stream_token(bob), rcvbuf=4096, pause_after=3
    )
    wait_server_blocked(s)
    assert api.http.delete("/channels/vip/members/bob", headers=hubs.admin).status_code == 204
    time.sleep(1.0)  # the contract's second, while the server is blocked in a write
    s.paused.clear()
    s.wait_for(lambda st: st.ended, timeout=30)
    got = s.ids()
    assert len(got) <= buffered_events_bound(), f"{len(got)} of {len(ids)} events after revocation"
    assert got == ids[: len(got)]
    assert last_notice(s) == "ssehub.channel_removed"
    assert s.notices("ssehub.channel_removed")[0].json == {"channel": "vip"}


def test_token_expiry_during_a_replay(
    start_server: Callable[..., Server], database_url: str
) -> None:
    """A stream token that expires while its replay is blocked on a slow reader:
    the stream must end with ``ssehub.expired`` soon after, not after the whole
    history has been replayed on an expired token."""
    srv = start_server(SSEHUB_STREAM_TOKEN_TTL_SECONDS="3")
    hubs = Hubs(Api(srv.url))
    try:
        hubs.channel("c")
        ids = publish_many(database_url, "c")
        until_the_instance_has(hubs, "c", ids[-1])
        token = hubs.stream_token(hubs.admin)
        payload = token.split(".")[1]
        expires_at = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))[
            "exp"
        ]
        # The hub's one ticker ends every stream of an expired token at once: a
        # live one that reads tells when it has.
        live = hubs.open("/channels/c/stream", token)
        live.wait_for(lambda st: bool(st.notices("ssehub.live")))
        s = hubs.open("/channels/c/stream?last_event_id=0", token, rcvbuf=4096, pause_after=3)
        wait_server_blocked(s)
        live.wait_for(lambda st: bool(st.notices("ssehub.expired")))
        s.paused.clear()
        s.wait_for(lambda st: st.ended, timeout=30)
        assert time.time() - expires_at < 5, "the stream outlived its token"
        got = s.ids()
        assert len(got) <= buffered_events_bound(), f"{len(got)} of {len(ids)} events after expiry"
        assert got == ids[: len(got)]
        assert last_notice(s) == "ssehub.expired"
    finally:
        hubs.close_all()


def test_control_message_whose_application_fails_is_not_lost(
    api: Api, hubs: Hubs, db: Db, database_url: str
) -> None:
    """A channel turns private; the server's re-check of who may still read it
    fails once (it waits on a lock and is cancelled). The message must not be
    lost: the stream of a non-member must still lose the channel."""
    hubs.channel("pub")
    bob = api.user("bob")
    s = hubs.open("/channels/pub/stream", hubs.stream_token(bob))
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    db.execute("BEGIN")
    db.execute("LOCK TABLE channel_members IN ACCESS EXCLUSIVE MODE")
    locker = db.fetch("SELECT pg_backend_pid()")[0][0]
    try:
        r = api.http.patch("/channels/pub", json={"private": True}, headers=hubs.admin)
        assert r.status_code == 200, r.text
        blocked: list[Any] = []

        def waiting_on_the_lock() -> bool:
            blocked[:] = asyncio.run(
                sql(
                    database_url,
                    "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND $1 = ANY(pg_blocking_pids(pid))",
                    locker,
                )
            )
            return bool(blocked)

        wait_until(waiting_on_the_lock, "a statement waiting on the lock", 5)
        assert len(blocked) == 1, f"expected the access re-check waiting on the lock: {blocked}"
        assert "channel_members" in blocked[0]["query"]
        cancel = "SELECT pg_cancel_backend($1)"
        assert asyncio.run(sql(database_url, cancel, blocked[0]["pid"]))[0][0]
    finally:
        db.execute("ROLLBACK")
    s.wait_for(lambda st: st.ended, timeout=5)
    assert [n.json for n in s.notices("ssehub.channel_removed")] == [{"channel": "pub"}]
