"""API keys for backend publishers, against real servers.

What a key may do (publish and read history where its patterns match, and
nothing else), how it is kept (a hash), how it is revoked (on every instance
within a second), that it never reaches a log, and ``ssehub api-key create``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx

from app.auth.api_keys import ApiKeyGrant
from tests.support import ROOT, TABLES, TEST_SECRET, Api, Server, auth, sql, wait_until

KEY = re.compile(r"ssehub_([a-z0-9]{12})_([A-Za-z0-9_-]{43})")
EVENT = {"type": "order.paid", "data": {"id": 42}}


def new_key(
    api: Api, publish: list[str], name: str = "orders-service", admin: dict[str, str] | None = None
) -> dict[str, object]:
    admin = admin or api.admin()
    r = api.http.post("/api-keys", json={"name": name, "publish": publish}, headers=admin)
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


def channel(api: Api, name: str, **fields: object) -> None:
    r = api.http.post("/channels", json={"name": name, **fields}, headers=api.admin())
    assert r.status_code == 201, r.text


def listed(api: Api) -> list[dict[str, object]]:
    r = api.http.get("/api-keys", headers=api.admin())
    assert r.status_code == 200, r.text
    keys: list[dict[str, object]] = r.json()
    return keys


def secret_of(key: str) -> str:
    match = KEY.fullmatch(key)
    assert match, key
    return match[2]


def test_a_key_is_shown_once_and_listed_without_it(api: Api) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    body = new_key(api, ["orders.*", "news"])
    assert set(body) == {"id", "name", "publish", "created_at", "key"}
    key = str(body["key"])
    assert KEY.fullmatch(key), key
    assert body["name"] == "orders-service" and body["publish"] == ["orders.*", "news"]
    assert datetime.fromisoformat(str(body["created_at"])) >= before
    other = str(new_key(api, ["news"], name="news-service")["key"])
    assert secret_of(other) != secret_of(key) and other[:19] != key[:19]

    r = api.http.get("/api-keys", headers=api.admin())
    assert key not in r.text and secret_of(key) not in r.text
    keys = r.json()
    assert [k["name"] for k in keys] == ["orders-service", "news-service"]
    assert set(keys[0]) == {"id", "name", "publish", "created_at", "last_used_at"}
    assert keys[0]["id"] == body["id"] and keys[0]["last_used_at"] is None

    admin = api.admin()
    assert api.http.delete(f"/api-keys/{body['id']}", headers=admin).status_code == 204
    assert [k["name"] for k in listed(api)] == ["news-service"]
    assert api.http.delete(f"/api-keys/{body['id']}", headers=admin).status_code == 404
    assert api.http.delete("/api-keys/999999999", headers=admin).status_code == 404
    assert api.http.delete("/api-keys/0", headers=admin).status_code == 422
    assert api.http.delete("/api-keys/nope", headers=admin).status_code == 422


def test_only_admins_manage_keys_and_patterns_are_checked(api: Api) -> None:
    admin, alice = api.admin(), api.user("alice")
    good = {"name": "k", "publish": ["orders.*"]}
    for headers, status in ((alice, 403), ({}, 401)):
        assert api.http.post("/api-keys", json=good, headers=headers).status_code == status
        assert api.http.get("/api-keys", headers=headers).status_code == status
        assert api.http.delete("/api-keys/1", headers=headers).status_code == status
    bad_bodies = [
        {"name": "k", "publish": []},
        {"name": "k", "publish": ["has space"]},
        {"name": "k", "publish": ["a/b"]},
        {"name": "k", "publish": ["x" * 67]},
        {"name": "k", "publish": ["nul\x00"]},
        {"name": "", "publish": ["news"]},
        {"name": "k" * 101, "publish": ["news"]},
        {"name": "k"},
        {"name": "k", "publish": ["news"], "admin": True},
    ]
    for body in bad_bodies:
        r = api.http.post("/api-keys", json=body, headers=admin)
        assert r.status_code == 422, (body, r.status_code, r.text)
    assert listed(api) == []


def test_only_a_hash_of_the_key_is_stored(api: Api, database_url: str) -> None:
    body = new_key(api, ["orders.*"])
    key = str(body["key"])
    rows = asyncio.run(sql(database_url, "SELECT * FROM api_keys"))
    assert len(rows) == 1
    row = dict(rows[0])
    assert bytes(row["secret_hash"]) == hashlib.sha256(key.encode()).digest()
    assert row["prefix"] == KEY.fullmatch(key)[1]  # type: ignore[index]
    # Neither the key nor its secret part is anywhere in the database.
    for table in TABLES:
        dump = asyncio.run(
            sql(database_url, f"SELECT coalesce(string_agg(t::text, ''), '') FROM {table} t")
        )
        text = dump[0][0]
        assert key not in text and secret_of(key) not in text, table


def test_last_used_at_is_recorded(api: Api) -> None:
    channel(api, "orders.eu")
    body = new_key(api, ["orders.*"])
    headers = auth(str(body["key"]))
    used = datetime.now(UTC)
    for _ in range(3):
        r = api.http.post("/channels/orders.eu/events", json=EVENT, headers=headers)
        assert r.status_code == 201, r.text
    # Written in batches (every 5 s), not by the requests themselves.
    wait_until(lambda: listed(api)[0]["last_used_at"] is not None, "last_used_at", timeout=8)
    at = datetime.fromisoformat(str(listed(api)[0]["last_used_at"]))
    assert used - timedelta(seconds=2) <= at <= datetime.now(UTC) + timedelta(seconds=2)


def test_a_key_publishes_and_reads_only_where_its_patterns_match(api: Api, server: Server) -> None:
    for name in ("orders.eu", "news"):
        channel(api, name)
    channel(api, "orders.vip", private=True)
    alice = api.user("alice")
    api.user("bob")
    key = str(new_key(api, ["orders.*", "@alice"])["key"])
    headers = auth(key)
    http = api.http

    # Allowed: single and batch publish, a private channel, alice's personal channel, history.
    r = http.post("/channels/orders.eu/events", json=EVENT, headers=headers)
    assert r.status_code == 201, r.text
    ids = [r.json()["id"]]
    batch = {"events": [EVENT, {"type": "order.sent", "data": None}]}
    r = http.post("/channels/orders.eu/events/batch", json=batch, headers=headers)
    assert r.status_code == 201, r.text
    ids += [e["id"] for e in r.json()["events"]]
    r = http.post("/channels/orders.vip/events", json=EVENT, headers=headers)
    assert r.status_code == 201, r.text
    r = http.post("/users/alice/events", json={"type": "dm", "data": "hi"}, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["channel"] == "@alice"
    r = http.get("/channels/orders.eu/events", headers=headers)
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()["events"]] == ids
    assert http.get("/channels/orders.vip/events", headers=headers).status_code == 200
    mine = http.get("/me/events", headers=alice).json()["events"]
    assert [(e["channel"], e["data"]) for e in mine] == [("@alice", "hi")]

    # A matching name that is no channel: 404.
    assert http.post("/channels/orders.none/events", json=EVENT, headers=headers).status_code == 404
    assert http.get("/channels/orders.none/events", headers=headers).status_code == 404

    # Channels and users its patterns do not match: 403, before the body is even read.
    refused = [
        ("POST", "/channels/news/events", EVENT),
        ("POST", "/channels/news/events/batch", batch),
        ("GET", "/channels/news/events", None),
        ("POST", "/users/bob/events", EVENT),
        ("POST", "/users/ghost/events", EVENT),
        ("POST", "/channels/orders/events", EVENT),  # "orders.*" needs the dot
    ]
    for method, path, body in refused:
        r = http.request(method, path, json=body, headers=headers)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
    r = http.post(
        "/channels/news/events",
        content=b"{not json",
        headers={**headers, "content-type": "application/json"},
    )
    assert r.status_code == 403

    # Every other endpoint family: 403, a key is not a user.
    others = [
        ("GET", "/users/me", None),
        ("GET", "/users", None),
        ("PATCH", "/users/alice", {"is_admin": True}),
        ("DELETE", "/users/alice", None),
        ("GET", "/channels", None),
        ("GET", "/channels/orders.eu", None),
        ("POST", "/channels", {"name": "orders.new"}),
        ("PATCH", "/channels/orders.eu", {"description": "x"}),
        ("DELETE", "/channels/orders.eu", None),
        ("GET", "/channels/orders.vip/members", None),
        ("PUT", "/channels/orders.vip/members/alice", None),
        ("GET", "/me/subscriptions", None),
        ("PUT", "/me/subscriptions/orders.eu", None),
        ("DELETE", "/me/subscriptions/orders.eu", None),
        ("GET", "/me/events", None),
        ("POST", "/auth/stream-token", None),
        ("POST", "/auth/stream-cookie", None),
        ("GET", "/api-keys", None),
        ("POST", "/api-keys", {"name": "more", "publish": ["*"]}),
        ("DELETE", "/api-keys/1", None),
    ]
    for method, path, body in others:
        r = http.request(method, path, json=body, headers=headers)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
    for path in ("/stream", "/channels/orders.eu/stream"):
        assert _stream_status(api.base_url + path, headers) == 403, path
        assert _stream_status(f"{api.base_url}{path}?access_token={key}") == 403, path
    assert http.get("/channels/orders.eu", headers=api.admin()).status_code == 200
    log = server.log()
    assert key not in log and secret_of(key) not in log


def test_a_star_key_reaches_no_personal_channel_an_at_star_key_does(api: Api) -> None:
    """``*`` was any channel, personal ones included: a key for "every channel"
    pushed to every user and read their personal history."""
    channel(api, "news")
    bob = api.user("bob")
    admin = api.admin()
    api.http.post("/users/bob/events", json={"type": "dm", "data": "secret"}, headers=admin)

    def key(patterns: list[str]) -> dict[str, str]:
        return auth(str(new_key(api, patterns, name="k", admin=admin)["key"]))

    star = key(["*"])
    assert api.http.post("/channels/news/events", json=EVENT, headers=star).status_code == 201
    assert api.http.get("/channels/news/events", headers=star).status_code == 200
    for pattern in (["*"], ["*bob"], ["*b*"], ["news", "*"]):
        headers = key(pattern)
        r = api.http.post("/users/bob/events", json={"type": "dm", "data": "x"}, headers=headers)
        assert r.status_code == 403, (pattern, r.status_code, r.text)
        r = api.http.get("/channels/@bob/events", headers=headers)
        assert r.status_code == 403, (pattern, r.status_code, r.text)
    mine = api.http.get("/me/events", headers=bob).json()["events"]
    assert [e["data"] for e in mine] == ["secret"], "a refused key published"
    # A pattern that begins with "@" matches personal channels, and only those.
    people = key(["@*"])
    r = api.http.post("/users/bob/events", json={"type": "dm", "data": "hi"}, headers=people)
    assert r.status_code == 201, r.text
    r = api.http.get("/channels/@bob/events", headers=people)
    assert r.status_code == 200 and len(r.json()["events"]) == 2, r.text
    assert api.http.post("/channels/news/events", json=EVENT, headers=people).status_code == 403
    one = key(["@b*b"])
    r = api.http.post("/users/bob/events", json={"type": "dm", "data": "hi"}, headers=one)
    assert r.status_code == 201, r.text


def test_a_pattern_of_nine_stars_does_not_block_the_event_loop(
    start_server: Callable[..., Server],
) -> None:
    """``a*a*a*a*a*a*a*a*a*b`` against a 64-character name: a backtracking regex
    takes minutes and holds the event loop, so /healthz went unanswered."""
    srv = start_server()
    api = Api(srv.url)
    key = auth(str(new_key(api, ["a*a*a*a*a*a*a*a*a*b"], name="stars")["key"]))
    name = "a" * 64

    def publish() -> tuple[int, float]:
        started = time.monotonic()
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            status = http.post(f"/channels/{name}/events", json=EVENT, headers=key).status_code
        return status, time.monotonic() - started

    def healthy_until_answered() -> bool:
        """/healthz answers at once; whether every publish has its answer."""
        started = time.monotonic()
        r = httpx.get(f"{srv.url}/healthz", timeout=5)
        waited = time.monotonic() - started
        assert r.status_code == 200 and waited < 1.0, f"/healthz took {waited:.1f} s"
        return all(f.done() for f in publishes)

    with ThreadPoolExecutor(4) as pool:
        publishes = [pool.submit(publish) for _ in range(3)]
        wait_until(healthy_until_answered, "the publishes answered", timeout=5)
        for status, took in (f.result() for f in publishes):
            assert status == 403 and took < 2.0, (status, took)
    # The matcher still matches what it should.
    assert api.http.post(f"/channels/{name}/events", json=EVENT, headers=key).status_code == 403
    good = auth(str(new_key(api, ["a*a*a*a*a*a*a*a*a*a"], name="stars-ok")["key"]))
    r = api.http.post(f"/channels/{name}/events", json=EVENT, headers=good)
    assert r.status_code == 404, r.text  # allowed; no such channel


def test_malformed_or_unknown_keys_are_401(api: Api) -> None:
    channel(api, "orders.eu")
    body = new_key(api, ["orders.*"])
    key = str(body["key"])
    prefix, secret = KEY.fullmatch(key)[1], secret_of(key)  # type: ignore[index]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    bad = [
        "ssehub_",
        "ssehub_nope",
        f"ssehub_{prefix}_",
        f"ssehub_{prefix}_{flipped}",  # the right prefix, a wrong secret
        f"ssehub_{prefix}_{secret}x",
        f"ssehub_{prefix}_{secret[:-1]}",
        f"ssehub_{'a' * 12}_{secrets.token_urlsafe(32)}",  # well formed, unknown
        key.upper(),
    ]
    for token in bad:
        headers = {"Authorization": f"Bearer {token}"}
        for method, path, json in (
            ("POST", "/channels/orders.eu/events", EVENT),
            ("GET", "/channels/orders.eu/events", None),
            ("GET", "/users/me", None),
        ):
            r = api.http.request(method, path, json=json, headers=headers)
            assert r.status_code == 401, (token, path, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        assert _stream_status(api.base_url + "/stream", headers) == 401, token
    # The good key still works after all that.
    assert (
        api.http.post("/channels/orders.eu/events", json=EVENT, headers=auth(key)).status_code
        == 201
    )


def test_revocation_reaches_every_instance_within_a_second(
    start_server: Callable[..., Server],
) -> None:
    one, two = start_server(), start_server()
    a, b = Api(one.url), Api(two.url)
    channel(a, "orders.eu")
    channel(a, "news")
    body = new_key(a, ["orders.*"])
    key = str(body["key"])
    headers = auth(key)
    prefix, secret = KEY.fullmatch(key)[1], secret_of(key)  # type: ignore[index]
    wrong = auth(f"ssehub_{prefix}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}")
    for api in (a, b):  # used on both: each instance has checked (and remembers) it
        assert (
            api.http.post("/channels/orders.eu/events", json=EVENT, headers=headers).status_code
            == 201
        )
        assert api.http.get("/channels/orders.eu/events", headers=headers).status_code == 200
        # ...and failed uses, which must not log it either.
        assert (
            api.http.post("/channels/news/events", json=EVENT, headers=headers).status_code == 403
        )
        assert api.http.get("/users/me", headers=headers).status_code == 403
        assert api.http.get("/channels/orders.eu/events", headers=wrong).status_code == 401
        assert _stream_status(f"{api.base_url}/stream?access_token={key}") == 403
        assert _stream_status(f"{api.base_url}/channels/orders.eu/stream", headers) == 403

    r = a.http.delete(f"/api-keys/{body['id']}", headers=a.admin())
    assert r.status_code == 204
    revoked = time.monotonic()
    # History is answered from what each instance remembers of the key: it is the
    # read that shows how long an instance takes to forget it.
    pending = {one.url: a, two.url: b}
    while pending:
        for url, api in list(pending.items()):
            status = api.http.get("/channels/orders.eu/events", headers=headers).status_code
            if status == 401:
                del pending[url]
            else:
                assert status == 200, status
        assert time.monotonic() - revoked < 1.0, f"still accepted after 1 s on {list(pending)}"
        time.sleep(0.02)
    for api in (a, b):
        r = api.http.post("/channels/orders.eu/events", json=EVENT, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert _stream_status(f"{api.base_url}/stream?access_token={key}") == 401

    for srv in (one, two):
        log = srv.log()
        assert "access_token=[redacted]" in log  # the stream attempts were logged...
        assert key not in log and secret not in log  # ...without the key


def test_the_cli_creates_a_working_key(api: Api, database_url: str) -> None:
    channel(api, "orders.eu")
    done = _cli(
        "api-key",
        "create",
        "cli-orders",
        "--publish",
        "orders.*",
        "@alice",
        database_url=database_url,
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert KEY.fullmatch(key), done.stdout  # the key alone on stdout, for scripts
    assert key not in done.stderr
    r = api.http.post("/channels/orders.eu/events", json=EVENT, headers=auth(key))
    assert r.status_code == 201, r.text
    assert [(k["name"], k["publish"]) for k in listed(api)] == [
        ("cli-orders", ["orders.*", "@alice"])
    ]

    for args in (
        ["bad", "--publish", "orders.eu", "has space"],  # one bad pattern among good ones
        ["", "--publish", "orders.eu"],
    ):
        done = _cli("api-key", "create", *args, database_url=database_url)
        assert done.returncode != 0, args
        assert "Traceback" not in done.stderr and not KEY.search(done.stdout), (args, done.stderr)
    assert len(listed(api)) == 1


def _cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={**os.environ, "SSEHUB_SECRET_KEY": TEST_SECRET, "SSEHUB_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _stream_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The status a stream endpoint answers, without waiting on a stream that opened."""
    with httpx.stream("GET", url, headers=headers or {}, timeout=10) as r:
        return r.status_code


def test_the_pattern_matcher_agrees_with_the_glob_it_stands_for() -> None:
    """The linear matcher against the regular expression it replaces, on every
    pattern and name over a small alphabet (short enough for the regex)."""
    patterns = ["".join(p) for n in range(6) for p in itertools.product("ab*", repeat=n)]
    names = ["".join(p) for n in range(7) for p in itertools.product("ab", repeat=n)]
    for pattern in patterns:
        grant = ApiKeyGrant(1, (pattern,))
        glob = re.compile(".*".join(re.escape(part) for part in pattern.split("*")))
        for name in names:
            assert grant.allows(name) == bool(glob.fullmatch(name)), (pattern, name)
            if pattern.startswith("*"):  # "*..." never reaches a personal channel
                assert not grant.allows("@" + name), (pattern, name)
            assert ApiKeyGrant(1, ("@" + pattern,)).allows("@" + name) == bool(
                glob.fullmatch(name)
            ), (pattern, name)
