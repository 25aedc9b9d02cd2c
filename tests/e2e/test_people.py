"""People on real servers: the stream cookie, managing users, personal channels.

Two ``ssehub serve`` processes share the test database for the whole module
(tables are emptied before each test): instance ``one`` keeps the default
Secure cookie with a stream token TTL of its own, ``two`` has
``SSEHUB_COOKIE_SECURE=false``; both allow the origin http://good.example.
Streams are read over raw sockets (``SseStream``), requests made with httpx.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import Api, Server, auth, sql
from tests.support.sse import SseStream

GOOD, EVIL = "http://good.example", "http://evil.example"
ONE_TTL = 1234  # instance one's stream token lifetime, so Max-Age shows it is the TTL
WITHIN = 1.5  # seconds: the contract says 1 s; the margin is for a loaded test machine
STREAM_COOKIE = "ssehub_stream"


@pytest.fixture(scope="module")
def servers(database_url: str) -> Iterator[tuple[Server, Server]]:
    one = Server(
        database_url,
        env={"SSEHUB_CORS_ORIGINS": GOOD, "SSEHUB_STREAM_TOKEN_TTL_SECONDS": str(ONE_TTL)},
    ).start()
    try:
        two = Server(
            database_url,
            env={
                "SSEHUB_CORS_ORIGINS": GOOD,
                "SSEHUB_COOKIE_SECURE": "false",
                # Logins at two outlive its default stream TTL, so a cookie is not
                # cut short by the token that asked for it (3599 a second later).
                "SSEHUB_ACCESS_TOKEN_TTL_SECONDS": "7200",
            },
        ).start()
        try:
            yield one, two
        finally:
            two.stop()
    finally:
        one.stop()


class People:
    """Calls against both instances (``one``, ``two`` are their base URLs)."""

    def __init__(self, one: Server, two: Server) -> None:
        self.one, self.two = one.url, two.url
        self.http = httpx.Client(timeout=30)
        self.admin = Api(self.one).admin()
        self.streams: list[SseStream] = []

    def user(self, name: str) -> dict[str, str]:
        """Register ``name`` and return its auth headers."""
        r = self.http.post(
            f"{self.one}/auth/register", json={"username": name, "password": "password-123"}
        )
        assert r.status_code == 201, r.text
        r = self.http.post(
            f"{self.two}/auth/token", data={"username": name, "password": "password-123"}
        )
        assert r.status_code == 200, r.text
        return auth(r.json()["access_token"])

    def channel(self, name: str, private: bool = False) -> None:
        r = self.http.post(
            f"{self.one}/channels", json={"name": name, "private": private}, headers=self.admin
        )
        assert r.status_code == 201, r.text

    def subscribe(self, who: dict[str, str], channel: str) -> None:
        r = self.http.put(f"{self.two}/me/subscriptions/{channel}", headers=who)
        assert r.status_code == 201, r.text

    def publish(self, base: str, channel: str, data: Any = None) -> int:
        r = self.http.post(
            f"{base}/channels/{channel}/events", json={"data": data}, headers=self.admin
        )
        assert r.status_code == 201, r.text
        event_id: int = r.json()["id"]
        return event_id

    def push(self, base: str, username: str, data: Any = None, **headers: str) -> httpx.Response:
        return self.http.post(
            f"{base}/users/{username}/events",
            json={"type": "note", "data": data},
            headers=headers or self.admin,
        )

    def stream_token(self, who: dict[str, str]) -> str:
        r = self.http.post(f"{self.one}/auth/stream-token", headers=who)
        assert r.status_code == 200, r.text
        token: str = r.json()["stream_token"]
        return token

    def cookie(self, base: str, who: dict[str, str]) -> str:
        """POST /auth/stream-cookie; the ``Cookie`` header a browser would send back."""
        r = self.http.post(f"{base}/auth/stream-cookie", headers=who)
        assert r.status_code == 204, r.text
        name, value, _ = set_cookie(r)
        return f"{name}={value}"

    def open(self, base: str, path: str, **headers: str) -> SseStream:
        stream = SseStream(f"{base}{path}", headers=headers)
        self.streams.append(stream)
        return stream

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self.http.close()


@pytest.fixture
def people(servers: tuple[Server, Server]) -> Iterator[People]:
    p = People(*servers)
    yield p
    p.close()


def set_cookie(response: httpx.Response) -> tuple[str, str, dict[str, str]]:
    """The one ``Set-Cookie`` of a response: name, value and attributes (names lowercased)."""
    (header,) = response.headers.get_list("set-cookie")
    first, *parts = [part.strip() for part in header.split(";")]
    name, _, value = first.partition("=")
    attributes = {}
    for part in parts:
        key, _, val = part.partition("=")
        attributes[key.lower()] = val
    return name, value, attributes


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def live(*streams: SseStream) -> None:
    for stream in streams:
        assert stream.status == 200, (stream.status, stream.raw[:200])
        stream.wait_for(lambda s: bool(s.notices("ssehub.live")))


def wait_all(predicate: Any, streams: list[SseStream], timeout: float) -> float:
    """Seconds until ``predicate`` holds for every stream (AssertionError past ``timeout``)."""
    started = time.monotonic()
    for stream in streams:
        stream.wait_for(predicate, timeout=max(0.0, timeout - (time.monotonic() - started)))
    return time.monotonic() - started


# -- the stream cookie ------------------------------------------------------------


def test_cookie_alone_opens_both_streams_and_no_rest_endpoint(people: People) -> None:
    alice = people.user("alice")
    people.channel("news")
    people.subscribe(alice, "news")
    cookie = people.cookie(people.one, alice)
    # Set on one, shown to two: the same secret, no token anywhere but the cookie.
    everything = people.open(people.two, "/stream", Cookie=cookie)
    news = people.open(people.one, "/channels/news/stream", Cookie=cookie)
    live(everything, news)
    first = people.publish(people.one, "news", 1)
    pushed = people.push(people.two, "alice", 2)
    assert pushed.status_code == 201, pushed.text
    assert everything.wait_ids(2) == [first, pushed.json()["id"]]
    assert news.wait_ids(1) == [first]

    # The cookie opens streams only: a browser attaches it to every request to
    # ssehub, so a REST endpoint that took it would act for whichever page asked.
    refused = [
        ("GET", "/users/me"),
        ("GET", "/me/subscriptions"),
        ("GET", "/me/events"),
        ("GET", "/channels/news/events"),
        ("POST", "/auth/stream-cookie"),
        ("POST", "/auth/stream-token"),
    ]
    for method, path in refused:
        r = people.http.request(method, f"{people.one}{path}", headers={"Cookie": cookie})
        assert r.status_code == 401, (method, path, r.status_code)
    r = people.http.post(
        f"{people.one}/channels/news/events", json={"data": 1}, headers={"Cookie": cookie}
    )
    assert r.status_code == 401
    assert people.open(people.one, "/stream").status == 401  # no cookie, nothing


def test_cookie_attributes_and_clearing(people: People) -> None:
    alice = people.user("alice")
    r = people.http.post(f"{people.one}/auth/stream-cookie", headers=alice)
    assert r.status_code == 204
    name, token, attributes = set_cookie(r)
    assert name == STREAM_COOKIE
    assert "httponly" in attributes and "secure" in attributes  # Secure by default
    assert attributes["samesite"].lower() == "lax"
    assert attributes["path"] == "/"
    assert attributes["max-age"] == str(ONE_TTL)
    token_claims = claims(token)  # a stream token, living exactly as long as the cookie
    assert token_claims["scope"] == "stream"
    assert token_claims["exp"] - token_claims["iat"] == ONE_TTL

    r = people.http.post(f"{people.two}/auth/stream-cookie", headers=alice)
    _, _, attributes = set_cookie(r)
    assert "secure" not in attributes  # SSEHUB_COOKIE_SECURE=false
    assert "httponly" in attributes
    assert attributes["max-age"] == "3600"  # the default stream token TTL

    for base, secure in ((people.one, True), (people.two, False)):
        # No credentials needed: logging out works after the login expired.
        r = people.http.delete(f"{base}/auth/stream-cookie")
        assert r.status_code == 204
        name, value, attributes = set_cookie(r)
        assert (name, value.strip('"')) == (STREAM_COOKIE, "")
        assert attributes["max-age"] == "0"
        # The same Path and Secure, or a browser would keep the cookie it has.
        assert attributes["path"] == "/"
        assert ("secure" in attributes) is secure


def test_cors_allows_credentials_for_the_configured_origin_only(people: People) -> None:
    alice = people.user("alice")
    cookie = people.cookie(people.two, alice)

    good = people.open(people.one, "/stream", Cookie=cookie, Origin=GOOD)
    evil = people.open(people.one, "/stream", Cookie=cookie, Origin=EVIL)
    live(good, evil)  # CORS is the browser's to enforce: the server only withholds headers
    assert good.response_headers["access-control-allow-origin"] == GOOD
    assert good.response_headers["access-control-allow-credentials"] == "true"
    assert "access-control-allow-origin" not in evil.response_headers

    def preflight(path: str, origin: str, method: str, headers: str) -> httpx.Response:
        return people.http.options(
            f"{people.two}{path}",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": headers,
            },
        )

    for path, method, headers in (
        ("/stream", "GET", "last-event-id"),
        ("/channels/news/stream", "GET", "last-event-id"),
        ("/auth/stream-cookie", "POST", "authorization"),  # fetch(..., {credentials: 'include'})
    ):
        r = preflight(path, GOOD, method, headers)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["access-control-allow-origin"] == GOOD
        assert r.headers["access-control-allow-credentials"] == "true"
        r = preflight(path, EVIL, method, headers)
        assert r.status_code == 400, path
        assert "access-control-allow-origin" not in r.headers

    # The cookie POST itself from the allowed origin: the browser may store its cookie.
    r = people.http.post(f"{people.two}/auth/stream-cookie", headers={**alice, "Origin": GOOD})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == GOOD
    assert r.headers["access-control-allow-credentials"] == "true"
    r = people.http.post(f"{people.two}/auth/stream-cookie", headers={**alice, "Origin": EVIL})
    assert "access-control-allow-origin" not in r.headers


# -- managing users -----------------------------------------------------------------


def test_users_list_promote_demote_delete_admin_only(people: People) -> None:
    one, two, admin = people.one, people.two, people.admin
    users = {name: people.user(name) for name in ("alice", "bob", "carol", "dave")}

    def names(query: str, base: str = one, who: dict[str, str] = admin) -> list[str]:
        r = people.http.get(f"{base}/users{query}", headers=who)
        assert r.status_code == 200, r.text
        return [u["username"] for u in r.json()]

    assert names("?limit=2") == ["admin", "alice"]
    assert names("?limit=2&after=alice", base=two) == ["bob", "carol"]
    assert names("?after=carol") == ["dave"]
    alice_out = people.http.get(f"{one}/users?after=admin&limit=1", headers=admin).json()[0]
    assert set(alice_out) == {"id", "username", "is_admin", "created_at"}
    assert (alice_out["username"], alice_out["is_admin"]) == ("alice", False)
    for query in ("?limit=0", "?limit=1001"):
        assert people.http.get(f"{one}/users{query}", headers=admin).status_code == 422

    # Not an admin: 403 for each; no credentials: 401; an API key: 403.
    bob = users["bob"]
    assert people.http.get(f"{one}/users", headers=bob).status_code == 403
    assert (
        people.http.patch(f"{one}/users/alice", json={"is_admin": True}, headers=bob).status_code
        == 403
    )
    assert people.http.delete(f"{one}/users/alice", headers=bob).status_code == 403
    assert people.http.get(f"{one}/users").status_code == 401
    r = people.http.post(f"{one}/api-keys", json={"name": "k", "publish": ["*"]}, headers=admin)
    key = auth(r.json()["key"])
    assert people.http.get(f"{one}/users", headers=key).status_code == 403
    assert people.http.delete(f"{one}/users/alice", headers=key).status_code == 403

    # Unknown users: 404. Bad bodies: 422.
    assert (
        people.http.patch(f"{one}/users/nobody", json={"is_admin": True}, headers=admin).status_code
        == 404
    )
    assert people.http.delete(f"{two}/users/nobody", headers=admin).status_code == 404
    for body in ({}, {"is_admin": "maybe"}, {"is_admin": True, "username": "x"}):
        assert people.http.patch(f"{one}/users/alice", json=body, headers=admin).status_code == 422

    # Promote on one, the new admin's rights hold on two; demote, and they are gone.
    r = people.http.patch(f"{one}/users/alice", json={"is_admin": True}, headers=admin)
    assert r.status_code == 200 and r.json()["is_admin"] is True
    assert names("", base=two, who=users["alice"])[0] == "admin"
    r = people.http.patch(f"{two}/users/alice", json={"is_admin": False}, headers=admin)
    assert r.status_code == 200 and r.json()["is_admin"] is False
    assert people.http.get(f"{one}/users", headers=users["alice"]).status_code == 403

    assert people.http.delete(f"{one}/users/dave", headers=admin).status_code == 204
    assert "dave" not in names("")
    for base in (one, two):
        assert people.http.get(f"{base}/users/me", headers=users["dave"]).status_code == 401
    assert people.http.delete(f"{one}/users/dave", headers=admin).status_code == 404


def test_users_delete_and_demote_end_or_narrow_open_streams_on_two_instances_within_1_5_s(
    people: People,
) -> None:
    one, two, admin = people.one, people.two, people.admin
    people.channel("news")
    people.channel("vip", private=True)

    # Deleting: every stream of the user ends, on both instances, and its
    # credentials (access token, stream token, cookie) are refused everywhere.
    carol = people.user("carol")
    people.subscribe(carol, "news")
    token, cookie = people.stream_token(carol), people.cookie(one, carol)
    doomed = [
        people.open(one, "/stream", Authorization=f"Bearer {token}"),
        people.open(two, "/channels/news/stream", Cookie=cookie),
        people.open(two, "/stream", Cookie=cookie),
    ]
    live(*doomed)
    started = time.monotonic()
    assert people.http.delete(f"{one}/users/carol", headers=admin).status_code == 204
    took = wait_all(lambda s: s.ended, doomed, timeout=WITHIN)
    assert time.monotonic() - started < WITHIN, took
    for base in (one, two):
        assert people.http.get(f"{base}/users/me", headers=carol).status_code == 401
        assert people.http.post(f"{base}/auth/stream-cookie", headers=carol).status_code == 401
        assert people.open(base, "/stream", Authorization=f"Bearer {token}").status == 401
        assert people.open(base, "/channels/news/stream", Cookie=cookie).status == 401

    # Demoting: the admin's streams stop carrying the private channel it is not a
    # member of, on both instances; public channels keep flowing; its tokens stay.
    alice = people.user("alice")
    r = people.http.patch(f"{one}/users/alice", json={"is_admin": True}, headers=admin)
    assert r.status_code == 200
    people.subscribe(alice, "news")
    people.subscribe(alice, "vip")  # an admin may read it, so may subscribe
    token, cookie = people.stream_token(alice), people.cookie(two, alice)
    everything = [
        people.open(one, "/stream", Authorization=f"Bearer {token}"),
        people.open(two, "/stream", Cookie=cookie),
    ]
    only_vip = people.open(two, "/channels/vip/stream", Cookie=cookie)
    live(*everything, only_vip)
    before = [people.publish(one, "vip", 1), people.publish(two, "news", 2)]
    for stream in everything:
        assert stream.wait_ids(2) == before

    started = time.monotonic()
    r = people.http.patch(f"{one}/users/alice", json={"is_admin": False}, headers=admin)
    assert r.status_code == 200
    removed = [*everything, only_vip]
    took = wait_all(lambda s: bool(s.notices("ssehub.channel_removed")), removed, WITHIN)
    assert time.monotonic() - started < WITHIN, took
    for stream in removed:
        assert [n.json for n in stream.notices("ssehub.channel_removed")] == [{"channel": "vip"}]
    only_vip.wait_for(lambda s: s.ended, timeout=2)  # nothing left to carry

    # vip first: ids are visible in order, so once the news event arrives a
    # vip event carried by the stream would have arrived before it.
    people.publish(two, "vip", 3)
    later = people.publish(one, "news", 4)
    for stream in everything:
        assert stream.wait_ids(3) == [*before, later]
        assert not stream.ended
    # The same credentials still work, with a user's rights.
    me = people.http.get(f"{two}/users/me", headers=alice).json()
    assert me["is_admin"] is False
    assert people.http.get(f"{one}/channels/vip", headers=alice).status_code == 404
    again = people.open(one, "/stream", Cookie=cookie)
    live(again)
    assert people.open(two, "/channels/vip/stream", Authorization=f"Bearer {token}").status == 404


# -- personal channels ---------------------------------------------------------------


def test_personal_channels_two_instances_no_subscription_interleaved_resume_isolated(
    people: People,
) -> None:
    """Delivery on two instances with no subscription, interleaved in id order
    with other channels, resume across both kinds, isolation from other users."""
    one, two = people.one, people.two
    people.channel("news")
    alice, bob = people.user("alice"), people.user("bob")
    people.subscribe(alice, "news")
    people.subscribe(bob, "news")
    alice_cookie = people.cookie(one, alice)
    on_one = people.open(one, "/stream", Authorization=f"Bearer {people.stream_token(alice)}")
    on_two = people.open(two, "/stream", Cookie=alice_cookie)
    bobs = people.open(two, "/stream", Authorization=f"Bearer {people.stream_token(bob)}")
    live(on_one, on_two, bobs)

    # Two publishers at once, each through both instances: alice's personal
    # pushes and news events interleave in id order.
    channel_of: dict[int, str] = {}
    lock = threading.Lock()

    def pushes() -> None:
        for i in range(12):
            r = people.push((one, two)[i % 2], "alice", i)
            assert r.status_code == 201, r.text
            event = r.json()
            assert event["channel"] == "@alice"
            with lock:
                channel_of[event["id"]] = "@alice"

    def news() -> None:
        for i in range(12):
            event_id = people.publish((two, one)[i % 2], "news", i)
            with lock:
                channel_of[event_id] = "news"

    threads = [threading.Thread(target=pushes), threading.Thread(target=news)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = sorted(channel_of)
    news_ids = [i for i in everything if channel_of[i] == "news"]
    for stream in (on_one, on_two):
        assert stream.wait_ids(24) == everything  # strictly increasing, none missing
        assert [f.json["channel"] for f in stream.events()] == [channel_of[i] for i in everything]
    assert set(channel_of.values()) == {"@alice", "news"}

    # Resume: what was published while away, of both kinds, exactly.
    last = on_two.ids()[-1]
    on_two.close()
    missed = []
    for i in range(3):
        r = people.push(two, "alice", f"missed {i}")
        assert r.status_code == 201
        missed += [r.json()["id"], people.publish(one, "news", f"missed {i}")]
    resumed = people.open(two, "/stream", Cookie=alice_cookie, **{"Last-Event-ID": str(last)})
    assert resumed.wait_ids(6) == missed
    resumed.wait_for(lambda s: bool(s.notices("ssehub.live")))
    assert resumed.notices("ssehub.live")[0].json == {"replayed": 6}
    assert [f.json["channel"] for f in resumed.events()] == ["@alice", "news"] * 3
    on_one.wait_ids(30)

    # Bob, subscribed to news too, never sees alice's. A news event published
    # after all of them comes last: by the ordering guarantee, nothing with a
    # lower id (every event of alice's) can reach his stream after it.
    bob_news = [*news_ids, *missed[1::2], people.publish(one, "news", "after all")]
    assert bobs.wait_ids(len(bob_news)) == bob_news
    assert b"@alice" not in bytes(bobs.raw)

    # History: GET /me/events is alice's personal history; bob's is empty.
    r = people.http.get(f"{one}/me/events?limit=1000", headers=alice)
    mine = [e["id"] for e in r.json()["events"]]
    assert mine == [i for i in everything if channel_of[i] == "@alice"] + missed[0::2]
    assert people.http.get(f"{two}/me/events", headers=bob).json() == {
        "events": [],
        "next_after": None,
    }
    page = people.http.get(f"{two}/me/events?limit=5", headers=alice).json()
    assert [e["id"] for e in page["events"]] == mine[:5] and page["next_after"] == mine[4]


def test_personal_channel_rights_api_key_listing_and_deletion(
    people: People, database_url: str
) -> None:
    """Bob cannot read alice's channel; an API key scoped to @alice pushes only
    to her; personal channels are not listed nor changed like channels; deleting
    alice deletes her channel and its events."""
    one, two, admin = people.one, people.two, people.admin
    people.channel("news")
    alice, bob = people.user("alice"), people.user("bob")
    bob_token = people.stream_token(bob)

    first = people.push(one, "alice", "hello")
    assert first.status_code == 201 and first.json()["channel"] == "@alice"
    for base in (one, two):
        stream = people.open(base, "/channels/@alice/stream", Authorization=f"Bearer {bob_token}")
        assert stream.status == 404
        assert people.http.get(f"{base}/channels/@alice/events", headers=bob).status_code == 404
    for who in (alice, admin):  # her own, and admins read everything
        r = people.http.get(f"{two}/channels/@alice/events", headers=who)
        assert [e["id"] for e in r.json()["events"]] == [first.json()["id"]]

    # Pushing: admins and matching API keys only; unknown users are 404.
    r = people.http.post(
        f"{one}/api-keys", json={"name": "alice-only", "publish": ["@alice"]}, headers=admin
    )
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    by_key = people.push(two, "alice", "from a backend", Authorization=f"Bearer {key}")
    assert by_key.status_code == 201, by_key.text
    assert by_key.json()["channel"] == "@alice"
    assert people.push(two, "bob", "no", Authorization=f"Bearer {key}").status_code == 403
    # A user: bob cannot see @alice (404, as for a private channel), alice sees it
    # but is no admin (403).
    assert people.push(one, "alice", "no", **bob).status_code == 404
    assert people.push(two, "alice", "no", **alice).status_code == 403
    assert people.push(one, "nobody").status_code == 404
    assert people.push(two, "nobody", Authorization=f"Bearer {key}").status_code == 403
    r = people.http.get(f"{one}/me/events", headers=alice)
    assert [e["id"] for e in r.json()["events"]] == [first.json()["id"], by_key.json()["id"]]

    # Not listed, not changed like a channel (it follows its user).
    for who in (admin, alice, bob):
        listed = people.http.get(f"{one}/channels?limit=1000", headers=who).json()
        assert [c["name"] for c in listed] == ["news"]
    refused = [
        ("PATCH", "/channels/@alice", {"description": "mine now"}),
        ("DELETE", "/channels/@alice", None),
        ("GET", "/channels/@alice/members", None),
        ("PUT", "/channels/@alice/members/bob", None),
        ("DELETE", "/channels/@alice/members/alice", None),
    ]
    for method, path, body in refused:
        r = people.http.request(method, f"{two}{path}", json=body, headers=admin)
        assert r.status_code == 403, (method, path, r.status_code, r.text)

    # Deleting alice deletes her personal channel and its events.
    (channel_id,) = [
        row[0]
        for row in asyncio.run(sql(database_url, "SELECT id FROM channels WHERE name = '@alice'"))
    ]
    assert people.http.delete(f"{two}/users/alice", headers=admin).status_code == 204
    left = asyncio.run(
        sql(
            database_url,
            "SELECT (SELECT count(*) FROM channels WHERE id = $1 OR name = '@alice'),"
            " (SELECT count(*) FROM events WHERE channel_id = $1)",
            channel_id,
        )
    )
    assert tuple(left[0]) == (0, 0)
    assert people.push(one, "alice").status_code == 404
    assert people.http.get(f"{one}/channels/@alice/events", headers=admin).status_code == 404
    # A new alice starts with an empty personal channel: nothing of the old one.
    again = people.user("alice")
    assert people.http.get(f"{two}/me/events", headers=again).json()["events"] == []
