"""The stream endpoints against a real ``ssehub serve``: framing, auth, resume, notices."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.support import Api, Hubs, auth, broker_events, metric, wait_until


def test_frames_are_byte_exact_and_headers_right(api: Api, hubs: Hubs, admin_token: str) -> None:
    hubs.channel("news")
    s = hubs.open("/channels/news/stream", admin_token)
    assert s.status == 200
    assert s.response_headers["content-type"].startswith("text/event-stream")
    assert s.response_headers["cache-control"] == "no-cache"
    assert s.response_headers["x-accel-buffering"] == "no"
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    event_id = hubs.publish("news", {"text": "hi\nthere", "n": 1})
    s.wait_ids(1)
    raw = bytes(s.raw)
    assert raw.startswith(b"retry: ")
    assert b'event: ssehub.live\ndata: {"replayed":0}\n\n' in raw
    frame_start = raw.index(b"id: %d\n" % event_id)
    frame = raw[frame_start : raw.index(b"\n\n", frame_start) + 2]
    lines = frame.split(b"\n")
    assert lines[0] == b"id: %d" % event_id
    assert lines[1] == b"event: message"
    assert lines[2].startswith(b'data: {"id":%d,"channel":"news","type":"message",' % event_id)
    assert b'"data":{"text":"hi\\nthere","n":1}' in lines[2]
    assert lines[3:] == [b"", b""]


def test_credentials_are_checked_before_the_stream(api: Api, hubs: Hubs, admin_token: str) -> None:
    hubs.channel("secret", private=True)
    hubs.channel("open")
    bob = api.user("bob")
    bob_token = bob["Authorization"].split()[1]
    assert httpx.get(f"{api.base_url}/stream").status_code == 401
    r = httpx.get(f"{api.base_url}/stream?access_token=garbage")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{api.base_url}/channels/secret/stream", headers=bob).status_code == 404
    assert httpx.get(f"{api.base_url}/channels/nope/stream", headers=bob).status_code == 404
    # An access token in the header, a stream token in the URL: both open streams.
    with httpx.stream("GET", f"{api.base_url}/channels/open/stream", headers=bob) as r:
        assert r.status_code == 200
    stream_token = hubs.stream_token(bob)
    s = hubs.open("/channels/open/stream", stream_token)
    assert s.status == 200
    # ...but a stream token opens nothing else.
    assert api.http.get("/users/me", headers=auth(stream_token)).status_code == 401
    assert bob_token != stream_token


def test_resume_replays_then_goes_live_without_gap_or_duplicate(
    api: Api, hubs: Hubs, admin_token: str
) -> None:
    hubs.channel("news")
    ids = [hubs.publish("news", i) for i in range(5)]
    s = hubs.open(f"/channels/news/stream?last_event_id={ids[1]}", admin_token)
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    assert s.ids() == ids[2:]
    assert s.notices("ssehub.live")[0].json == {"replayed": 3}
    later = hubs.publish("news", "live")
    assert s.wait_ids(4) == [*ids[2:], later]


def test_last_event_id_header_wins_over_query(api: Api, hubs: Hubs, admin_token: str) -> None:
    hubs.channel("news")
    ids = [hubs.publish("news", i) for i in range(4)]
    s = hubs.open(
        f"/channels/news/stream?last_event_id={ids[0]}",
        admin_token,
        headers={"Last-Event-ID": str(ids[2])},
    )
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    assert s.ids() == [ids[3]]


def test_garbage_positions_are_400(api: Api, hubs: Hubs) -> None:
    hubs.channel("news")
    for bad in ("abc", "-5", str(2**63), "1e3", "0x10", "١٢"):
        header = bad.encode()  # non-ASCII digits go as raw UTF-8 bytes
        r = httpx.get(
            f"{api.base_url}/channels/news/stream",
            headers={**hubs.admin, "Last-Event-ID": header},  # type: ignore[dict-item]
        )
        assert r.status_code == 400, bad
        r = httpx.get(
            f"{api.base_url}/channels/news/stream",
            params={"last_event_id": bad},
            headers=hubs.admin,
        )
        assert r.status_code == 400, bad
        assert "detail" in r.json()


def test_heartbeat_on_an_idle_stream(start_server, database_url: str) -> None:
    srv = start_server(SSEHUB_HEARTBEAT_SECONDS="0.3")
    hubs = Hubs(Api(srv.url))
    hubs.channel("quiet")
    s = hubs.open("/channels/quiet/stream", hubs.stream_token(hubs.admin))
    try:
        s.wait_for(lambda st: sum(f.comment for f in st.frames) >= 2, timeout=3)
    finally:
        s.close()


def test_token_expiry_ends_the_stream_with_a_notice(start_server) -> None:
    srv = start_server(SSEHUB_STREAM_TOKEN_TTL_SECONDS="2")
    api = Api(srv.url)
    hubs = Hubs(api)
    hubs.channel("news")
    s = hubs.open("/channels/news/stream", hubs.stream_token(hubs.admin))
    try:
        started = time.monotonic()
        s.wait_for(lambda st: st.ended, timeout=6)
        assert s.notices("ssehub.expired"), s.frames
        assert s.notices("ssehub.expired")[0].json == {}
        assert time.monotonic() - started < 4
    finally:
        s.close()


def test_deleting_a_channel_removes_it_from_open_streams(api: Api, hubs: Hubs) -> None:
    hubs.channel("doomed")
    hubs.channel("kept")
    bob = api.user("bob")
    for name in ("doomed", "kept"):
        assert api.http.put(f"/me/subscriptions/{name}", headers=bob).status_code == 201
    token = hubs.stream_token(bob)
    single = hubs.open("/channels/doomed/stream", token)
    multi = hubs.open("/stream", token)
    for s in (single, multi):
        s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    started = time.monotonic()
    assert api.http.delete("/channels/doomed", headers=hubs.admin).status_code == 204
    single.wait_for(lambda st: st.ended, timeout=2)
    multi.wait_for(lambda st: bool(st.notices("ssehub.channel_removed")), timeout=2)
    assert time.monotonic() - started < 1.5
    assert single.notices("ssehub.channel_removed")[0].json == {"channel": "doomed"}
    kept = hubs.publish("kept", "still here")
    assert multi.wait_ids(1) == [kept]
    assert not multi.ended


def test_removing_a_member_revokes_within_a_second(api: Api, hubs: Hubs) -> None:
    hubs.channel("vip", private=True)
    bob = api.user("bob")
    assert api.http.put("/channels/vip/members/bob", headers=hubs.admin).status_code == 204
    s = hubs.open("/channels/vip/stream", hubs.stream_token(bob))
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    hubs.publish("vip", "before")
    s.wait_ids(1)
    started = time.monotonic()
    assert api.http.delete("/channels/vip/members/bob", headers=hubs.admin).status_code == 204
    s.wait_for(lambda st: bool(st.notices("ssehub.channel_removed")), timeout=2)
    assert time.monotonic() - started < 1.0
    hubs.publish("vip", "after")
    wait_until(lambda: s.ended, "the server to end the stream")  # nothing can follow
    assert len(s.ids()) == 1


def test_subscription_changes_apply_to_open_streams(api: Api, hubs: Hubs) -> None:
    """A subscription added or removed while ``/stream`` is open applies to it:
    from the moment it does, every event of the added channel arrives, and none
    of the removed one. When that moment comes is observed, not slept for: probes
    are published until the stream shows the change."""
    hubs.channel("a")
    hubs.channel("b")
    bob = api.user("bob")
    api.http.put("/me/subscriptions/a", headers=bob)
    s = hubs.open("/stream", hubs.stream_token(bob))
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    first = hubs.publish("a", 1)
    hubs.publish("b", "not subscribed yet")
    assert s.wait_ids(1) == [first]

    assert api.http.put("/me/subscriptions/b", headers=bob).status_code == 201
    probes: list[int] = []

    def carries_b() -> bool:
        probes.append(hubs.publish("b", "probe"))
        return bool(set(probes) & set(s.ids()))

    wait_until(carries_b, "the stream to carry b")
    arrived = s.ids()[1:]
    assert arrived == probes[len(probes) - len(arrived) :]  # from the first, every one
    second = hubs.publish("b", 2)
    assert s.wait_ids(len(arrived) + 2)[-1] == second

    assert api.http.delete("/me/subscriptions/a", headers=bob).status_code == 204

    def dropped_a() -> bool:
        seen = len(s.ids())
        gone, kept = hubs.publish("a", "probe"), hubs.publish("b", "marker")
        got = s.wait_ids(seen + 1)
        if got[-1] == gone:  # still carried: its marker follows
            s.wait_ids(seen + 2)
            return False
        return got[-1] == kept

    wait_until(dropped_a, "the stream to drop a")
    seen = len(s.ids())
    hubs.publish("a", "unsubscribed")
    third = hubs.publish("b", 3)
    assert s.wait_ids(seen + 1)[-1] == third
    assert s.ids()[seen:] == [third]


def test_too_many_streams_is_429(start_server) -> None:
    srv = start_server(SSEHUB_MAX_STREAMS_PER_USER="2")
    api = Api(srv.url)
    hubs = Hubs(api)
    hubs.channel("news")
    token = hubs.stream_token(hubs.admin)
    try:
        for _ in range(2):
            assert hubs.open("/channels/news/stream", token).status == 200
        third = hubs.open("/channels/news/stream", token)
        assert third.status == 429
        hubs.opened[0].close()
        wait_until(lambda: metric(srv.url, "ssehub_streams_open") == 1, "the closed stream to go")
        assert hubs.open("/channels/news/stream", token).status == 200
    finally:
        hubs.close_all()


def test_resume_older_than_history_is_truncated(start_server) -> None:
    srv = start_server(SSEHUB_RETENTION_INTERVAL_SECONDS="0.1")
    api = Api(srv.url)
    hubs = Hubs(api)
    hubs.channel("short", max_events=2)
    ids = [hubs.publish("short", i) for i in range(5)]

    def retained() -> int:
        return len(api.http.get("/channels/short/events", headers=hubs.admin).json()["events"])

    wait_until(lambda: retained() == 2, "history cut to its last two events")
    s = hubs.open(f"/channels/short/stream?last_event_id={ids[0]}", hubs.stream_token(hubs.admin))
    try:
        s.wait_for(lambda st: bool(st.notices("ssehub.live")))
        assert s.notices("ssehub.truncated")[0].json == {"channel": "short", "oldest_id": ids[3]}
        assert s.ids() == ids[3:]
    finally:
        s.close()


def test_metrics_expose_the_stream_figures(api: Api, hubs: Hubs, admin_token: str) -> None:
    hubs.channel("news")
    s = hubs.open("/channels/news/stream", admin_token)
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    hubs.publish("news", 1)
    s.wait_ids(1)
    text = api.http.get("/metrics").text
    for name in (
        "ssehub_streams_open",
        "ssehub_events_published_total",
        "ssehub_events_delivered_total",
        "ssehub_delivery_latency_seconds_bucket",
        "ssehub_slow_reader_catchups_total",
        "ssehub_direct_writes_total",
    ):
        assert name in text
    assert "ssehub_streams_open 1.0" in text


def test_live_events_are_written_straight_to_an_idle_streams_socket(
    api: Api, hubs: Hubs, admin_token: str
) -> None:
    """Under ``ssehub serve`` (uvicorn's httptools protocol) the fan-out writes a
    parked stream's live events to its socket itself (``app.realtime.direct_write``).
    If uvicorn changes and that stops engaging, streams still work, through
    their writer task, so only this counter can tell."""
    hubs.channel("news")
    s = hubs.open("/channels/news/stream", admin_token)
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    before = metric(api.base_url, "ssehub_direct_writes_total")
    for n in range(3):
        hubs.publish("news", n)
        s.wait_ids(n + 1)
    assert metric(api.base_url, "ssehub_direct_writes_total") - before >= 3


def test_a_publishing_instance_hands_its_own_events_to_its_hub_once(
    api: Api, hubs: Hubs, admin_token: str
) -> None:
    """The committer's shortcut (``app.realtime.broker``, and the NATS broker's
    alike): with concurrent publishers on one instance, its own commits reach
    the hub without a read of the log; a notification that arrives before the
    writer's answer is read from the log instead (or, with NATS, comes over
    NATS). Either way each event reaches the hub once, in order."""
    hubs.channel("own")
    s = hubs.open("/channels/own/stream", admin_token)
    s.wait_for(lambda st: bool(st.notices("ssehub.live")))
    before = broker_events(api.base_url)
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: hubs.publish("own", i), range(400)))
    assert s.wait_ids(400) == sorted(ids)
    after = broker_events(api.base_url)
    by = {source: after[source] - before[source] for source in after}
    assert sum(by.values()) == 400, by
    assert by["commit"] > 400 - by["commit"], by
