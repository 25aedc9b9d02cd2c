"""Presence across real instances: lists, joins and leaves, grace, a killed
instance, revocation, and a channel without presence.

Every stream here is a real socket on a real ``ssehub serve``; the lists are
read over HTTP from either instance.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest
from ssehub_client import Client, SsehubError

from tests.support import Api, Hubs, Server, SseStream, run_cli, wait_until

FAST = {"SSEHUB_PRESENCE_GRACE_SECONDS": "1", "SSEHUB_PRESENCE_TTL_SECONDS": "3"}
JOIN_WITHIN = 1.0  # seconds: a join reaches every instance's streams within this (API.md)


def notices_of(stream: SseStream, kind: str, channel: str) -> list[str]:
    return [
        frame.json["username"]
        for frame in stream.notices(kind)
        if frame.json.get("channel") == channel
    ]


def wait_told(streams: list[SseStream], kind: str, username: str, timeout: float) -> float:
    """Wait until every stream was told ``kind`` (``ssehub.join`` or ``.leave``) of
    ``username`` in "room"; when the last of them was told (``time.monotonic``)."""
    for stream in streams:
        wait_until(
            lambda s=stream: username in notices_of(s, kind, "room"),
            timeout=timeout,
            what=f"{kind} of {username}",
        )
    return max(
        frame.at
        for stream in streams
        for frame in stream.notices(kind)
        if frame.json == {"channel": "room", "username": username}
    )


def listed(base: str, channel: str, headers: dict[str, str]) -> dict[str, int]:
    r = httpx.get(f"{base}/channels/{channel}/presence", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["channel"] == channel
    names = [user["username"] for user in body["users"]]
    assert names == sorted(names, key=str.encode), "not in username order"
    return {user["username"]: user["streams"] for user in body["users"]}


class People:
    """Users with stream tokens, opening streams on the instances."""

    def __init__(self, hubs: Hubs, names: list[str]) -> None:
        self.hubs = hubs
        self.headers = {name: hubs.api.user(name) for name in names}
        self.tokens = {name: hubs.stream_token(h) for name, h in self.headers.items()}

    def open(self, name: str, channel: str, server: Server) -> SseStream:
        stream = self.hubs.open(f"/channels/{channel}/stream", self.tokens[name], base=server.url)
        stream.wait_for(lambda s: bool(s.notices("ssehub.live")))
        return stream


def two_instances(start_server: Callable[..., Server]) -> tuple[Server, Server, Hubs, People]:
    """Two instances with the short grace and TTL, a presence channel "room",
    and three users."""
    a, b = start_server(**FAST), start_server(**FAST)
    hubs = Hubs(Api(a.url))
    hubs.channel("room", presence=True)
    return a, b, hubs, People(hubs, ["ann", "bob", "cyd"])


def test_two_instances_list_everyone_and_tell_every_join_and_leave(start_server) -> None:
    a, b, hubs, people = two_instances(start_server)
    try:
        ann = people.open("ann", "room", a)
        bob = people.open("bob", "room", b)
        bob2 = people.open("bob", "room", b)
        cy = people.open("cyd", "room", a)
        everyone = ["ann", "bob", "cyd"]
        for stream in (ann, bob, bob2, cy):
            wait_until(
                lambda s=stream: s.present("room") == everyone, timeout=2, what="everyone told"
            )
        for base in (a.url, b.url):
            wait_until(
                lambda base=base: (
                    listed(base, "room", hubs.admin) == {"ann": 1, "bob": 2, "cyd": 1}
                ),
                timeout=2,
                what="the list with stream counts",
            )
        # A join reaches both instances' streams within 1 s.
        deez_headers = hubs.api.user("deez")
        dee = hubs.open("/channels/room/stream", hubs.stream_token(deez_headers), base=b.url)
        opened = time.monotonic()
        assert wait_told([ann, bob, cy], "ssehub.join", "deez", timeout=2) - opened <= JOIN_WITHIN
        # One of bob's two streams closing is no leave. It closes on b before dee's
        # stream does: were it a leave, it would be told before dee's.
        bob2.close()
        wait_until(
            lambda: listed(a.url, "room", hubs.admin)["bob"] == 1, timeout=3, what="bob's count"
        )
        # A leave, once the grace is over, within 1 s of its end.
        dee.close()
        closed = time.monotonic()
        left = wait_told([ann, bob, cy], "ssehub.leave", "deez", timeout=4)
        assert 1 <= left - closed <= 1 + JOIN_WITHIN  # the grace, then within 1 s
        assert listed(b.url, "room", hubs.admin) == {"ann": 1, "bob": 1, "cyd": 1}
        for stream in (ann, bob, cy):
            assert notices_of(stream, "ssehub.leave", "room") == ["deez"]
            assert stream.present("room") == everyone
    finally:
        hubs.close_all()


def test_reconnect_within_grace_moves_nobody_and_staying_away_is_one_leave(start_server) -> None:
    srv = start_server(SSEHUB_PRESENCE_GRACE_SECONDS="2", SSEHUB_PRESENCE_TTL_SECONDS="5")
    hubs = Hubs(Api(srv.url))
    hubs.channel("room", presence=True)
    people = People(hubs, ["ann", "bob", "cyd"])
    try:
        ann = people.open("ann", "room", srv)
        bob = people.open("bob", "room", srv)
        cyd = people.open("cyd", "room", srv)
        everyone = ["ann", "bob", "cyd"]
        wait_until(lambda: ann.present("room") == everyone, timeout=2, what="all listed")
        for _ in range(3):  # bob drops and comes back within the grace
            bob.close()
            wait_until(
                lambda: listed(srv.url, "room", hubs.admin).get("bob") == 0,
                timeout=2,
                what="bob listed without a stream: in his grace",
            )
            bob = people.open("bob", "room", srv)
        # cyd leaves after bob's last drop: a leave of bob would be told before hers.
        cyd.close()
        wait_told([ann, bob], "ssehub.leave", "cyd", timeout=5)
        assert notices_of(ann, "ssehub.leave", "room") == ["cyd"]
        assert notices_of(ann, "ssehub.join", "room").count("bob") <= 1  # only the first
        assert bob.present("room") == ["ann", "bob"]
        bob.close()
        started = time.monotonic()
        wait_until(
            lambda: notices_of(ann, "ssehub.leave", "room") == ["cyd", "bob"],
            timeout=5,
            what="one leave",
        )
        assert time.monotonic() - started >= 1.9, "left before the grace ended"
        # cyd comes back after bob's leave: a second leave of bob, if any, would
        # be told before her join, or in the same turn.
        people.open("cyd", "room", srv)
        wait_until(
            lambda: notices_of(ann, "ssehub.join", "room").count("cyd") == 2,
            timeout=3,
            what="cyd joins again",
        )
        assert notices_of(ann, "ssehub.leave", "room") == ["cyd", "bob"]
        assert ann.present("room") == ["ann", "cyd"]
        assert listed(srv.url, "room", hubs.admin) == {"ann": 1, "cyd": 1}
    finally:
        hubs.close_all()


def test_killed_instance_users_leave_within_the_ttl_and_join_again(start_server) -> None:
    a, b, hubs, people = two_instances(start_server)
    try:
        ann = people.open("ann", "room", a)
        on_b = [people.open(name, "room", b) for name in ("bob", "cyd")]
        wait_until(
            lambda: ann.present("room") == ["ann", "bob", "cyd"], timeout=3, what="all listed"
        )
        assert b.process is not None
        b.process.kill()  # SIGKILL: it announces nothing
        killed = time.monotonic()
        wait_until(
            lambda: sorted(notices_of(ann, "ssehub.leave", "room")) == ["bob", "cyd"],
            timeout=3 + 2,
            what="the survivor announces the dead instance's leaves",
        )
        assert time.monotonic() - killed <= 3 + 2
        assert listed(a.url, "room", hubs.admin) == {"ann": 1}
        assert ann.present("room") == ["ann"]
        metrics = httpx.get(f"{a.url}/metrics").text
        assert "ssehub_presence_dead_leaves_total 2.0" in metrics
        for stream in on_b:
            stream.close()
        b.process = None
        b.start()  # the same port: its users' clients reconnect to it
        back = [people.open(name, "room", b) for name in ("bob", "cyd")]
        wait_until(
            lambda: ann.present("room") == ["ann", "bob", "cyd"], timeout=3, what="they join again"
        )
        assert notices_of(ann, "ssehub.join", "room").count("bob") == 2
        for stream in back:
            wait_until(
                lambda s=stream: s.present("room") == ["ann", "bob", "cyd"], timeout=3, what="told"
            )
    finally:
        hubs.close_all()


@pytest.mark.parametrize("revoked", ["removed", "deleted", "demoted"])
def test_losing_a_private_presence_channel_leaves_it_at_once(start_server, revoked: str) -> None:
    """Removed from the channel, deleted, or demoted from the admin who read it
    without being a member: bob leaves, and not after the 30 s grace, since
    no reconnect can bring him back."""
    srv = start_server(SSEHUB_PRESENCE_GRACE_SECONDS="30")
    hubs = Hubs(Api(srv.url))
    hubs.channel("vip", private=True, presence=True)
    people = People(hubs, ["ann", "bob"])
    http, admin = hubs.api.http, hubs.admin
    assert http.put("/channels/vip/members/ann", headers=admin).status_code == 204
    if revoked == "demoted":
        r = http.patch("/users/bob", json={"is_admin": True}, headers=admin)
    else:
        r = http.put("/channels/vip/members/bob", headers=admin)
    assert r.status_code in (200, 204), r.text
    try:
        ann = people.open("ann", "vip", srv)
        people.open("bob", "vip", srv)
        wait_until(lambda: ann.present("vip") == ["ann", "bob"], timeout=3, what="both listed")
        if revoked == "removed":
            r = http.delete("/channels/vip/members/bob", headers=admin)
        elif revoked == "deleted":
            r = http.delete("/users/bob", headers=admin)
        else:
            r = http.patch("/users/bob", json={"is_admin": False}, headers=admin)
        assert r.status_code in (200, 204), r.text
        wait_until(
            lambda: notices_of(ann, "ssehub.leave", "vip") == ["bob"], timeout=3, what="bob leaves"
        )
        assert listed(srv.url, "vip", admin) == {"ann": 1}
        assert ann.present("vip") == ["ann"]
        r = httpx.get(f"{srv.url}/channels/vip/presence", headers=people.headers["bob"])
        assert r.status_code == (401 if revoked == "deleted" else 404)
    finally:
        hubs.close_all()


def test_channel_without_presence_gets_no_notices_and_its_list_is_409(start_server) -> None:
    srv = start_server(**FAST)
    hubs = Hubs(Api(srv.url))
    hubs.channel("plain")
    hubs.channel("room", presence=True)
    people = People(hubs, ["ann", "bob"])
    try:
        ann = people.open("ann", "plain", srv)
        people.open("bob", "plain", srv)
        watcher = people.open("ann", "room", srv)
        wait_until(
            lambda: watcher.present("room") == ["ann"], timeout=3, what="presence where it is on"
        )
        # Waited out: nothing marks the absence of a notice, and a join reaches
        # every stream within 1 s (API.md), so any notice on "plain" is here by now.
        time.sleep(JOIN_WITHIN)
        kinds = {frame.event for frame in ann.notices() if frame.data}
        assert kinds == {"ssehub.live"}, kinds
        r = httpx.get(f"{srv.url}/channels/plain/presence", headers=people.headers["ann"])
        assert r.status_code == 409
        assert r.json()["detail"]
        # Turned off: the list is gone, and so are the notices.
        r = hubs.api.http.patch("/channels/room", json={"presence": False}, headers=hubs.admin)
        assert r.status_code == 200 and r.json()["presence"] is False
        r = httpx.get(f"{srv.url}/channels/room/presence", headers=people.headers["ann"])
        assert r.status_code == 409
        before = len(watcher.notices())
        people.open("bob", "room", srv)
        time.sleep(JOIN_WITHIN)  # as above: a join of bob would be here by now
        assert len(watcher.notices()) == before
    finally:
        hubs.close_all()


def test_presence_is_not_for_personal_channels_and_needs_a_reader(api: Api) -> None:
    admin = api.admin()
    r = api.http.post("/channels", json={"name": "room", "presence": "maybe"}, headers=admin)
    assert r.status_code == 422
    r = api.http.post("/channels", json={"name": "room", "presence": True}, headers=admin)
    assert r.status_code == 201 and r.json()["presence"] is True
    bob = api.user("bob")
    r = api.http.patch("/channels/@bob", json={"presence": True}, headers=admin)
    assert r.status_code in (403, 404)
    assert api.http.get("/channels/room/presence", headers=bob).json() == {
        "channel": "room",
        "users": [],
    }
    assert api.http.get("/channels/room/presence").status_code == 401
    assert api.http.get("/channels/nope/presence", headers=bob).status_code == 404


def test_python_client_and_cli_show_who_is_online(
    start_server: Callable[..., Server], database_url: str
) -> None:
    srv = start_server(**FAST)
    hubs = Hubs(Api(srv.url))
    hubs.channel("room", presence=True)
    hubs.channel("plain")
    people = People(hubs, ["ann", "bob"])
    token = people.headers["ann"]["Authorization"].removeprefix("Bearer ")
    try:
        people.open("ann", "room", srv)
        people.open("bob", "room", srv)
        people.open("bob", "room", srv)
        wait_until(
            lambda: listed(srv.url, "room", hubs.admin) == {"ann": 1, "bob": 2},
            timeout=3,
            what="listed",
        )
        with Client(srv.url, token=token) as client:
            shown = client.presence("room")
            assert shown["channel"] == "room"
            assert [(u["username"], u["streams"]) for u in shown["users"]] == [
                ("ann", 1),
                ("bob", 2),
            ]
            with pytest.raises(SsehubError) as refused:
                client.presence("plain")
            assert refused.value.status == 409
        done = run_cli(
            "presence", "room", database_url=database_url, SSEHUB_URL=srv.url, SSEHUB_TOKEN=token
        )
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert [(u["username"], u["streams"]) for u in lines] == [("ann", 1), ("bob", 2)]
    finally:
        hubs.close_all()
