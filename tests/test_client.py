"""The Python client (``ssehub_client``) and its CLI against live servers.

No mocks: a real ``ssehub serve``, restarted for real; the 503 a retried
publish meets is a real one, made by cutting the writer's database
connection (through a small TCP proxy) while its transaction waits for the
publish lock, so the first attempt commits on the database although the
client was told 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from httpx_sse import ServerSentEvent
from ssehub_client import AsyncClient, Client, Event, Notice, SsehubError, username_for
from ssehub_client.client import _batch, _history, _publish, _Retry, _Stream

from app.auth.external import username_for as server_username_for
from app.db import asyncpg_dsn
from app.events.publisher import PUBLISH_LOCK
from tests.support import ROOT, Api, CuttableProxy, Server, sql

CLIENT_CLI = str(Path(sys.executable).with_name("ssehub-client"))


class Setup:
    """An admin token, an API key for the test's channels, and channels."""

    def __init__(self, server: Server, *channels: str) -> None:
        self.url = server.url
        self.api = Api(server.url)
        self.token = self.api.login("admin", "admin-password-1")
        self.admin = {"Authorization": f"Bearer {self.token}"}
        for name in channels:
            r = self.api.http.post("/channels", json={"name": name}, headers=self.admin)
            assert r.status_code == 201, r.text
        r = self.api.http.post(
            "/api-keys", json={"name": "backend", "publish": [*channels, "@*"]}, headers=self.admin
        )
        assert r.status_code == 201, r.text
        self.key: str = r.json()["key"]

    def history(self, channel: str) -> list[dict[str, Any]]:
        r = self.api.http.get(f"/channels/{channel}/events?limit=1000", headers=self.admin)
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()["events"]
        return events


def as_dict(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "channel": event.channel,
        "type": event.type,
        "data": event.data,
        "published_at": event.published_at,
    }


async def take(
    items: AsyncIterator[Event | Notice], events: int, timeout: float = 10
) -> list[Event | Notice]:
    """Items of a stream until ``events`` events came, then the stream is closed."""
    got: list[Event | Notice] = []

    async def run() -> None:
        async for item in items:
            got.append(item)
            if sum(isinstance(i, Event) for i in got) >= events:
                return

    async with contextlib.aclosing(items):  # type: ignore[type-var]
        await asyncio.wait_for(run(), timeout)
    return got


def events_of(items: list[Event | Notice]) -> list[Event]:
    return [i for i in items if isinstance(i, Event)]


# -- publishing ---------------------------------------------------------------------------


async def test_publish_sync_and_async_with_a_key_or_a_token(server: Server) -> None:
    s = Setup(server, "news")
    s.api.register("bob")
    with Client(s.url, api_key=s.key) as hub:
        one = hub.publish("news", {"n": 1}, type="note")
        assert one["channel"] == "news" and one["type"] == "note" and one["data"] == {"n": 1}
        keyed = [hub.publish("news", {"n": 2}, idempotency_key="k-2") for _ in range(2)]
        assert keyed[0] == keyed[1]
        batch = hub.publish_batch("news", [{"type": "b", "data": i} for i in range(3)])
        assert [e["data"] for e in batch] == [0, 1, 2]
        assert [e["id"] for e in batch] == list(range(batch[0]["id"], batch[0]["id"] + 3))
        personal = hub.publish_to_user("bob", {"hi": "bob"})
        assert personal["channel"] == "@bob"
        page = hub.history("news", after=one["id"], limit=2)
        assert [e["id"] for e in page["events"]] == [keyed[0]["id"], batch[0]["id"]]
        with pytest.raises(SsehubError) as refused:
            hub.publish("elsewhere", 1)  # not among the key's patterns
        assert refused.value.status in (403, 404)
    async with AsyncClient(s.url, token=s.token) as ahub:
        two = await ahub.publish("news", {"n": 3})
        again = [await ahub.publish("news", {"n": 4}, idempotency_key="k-4") for _ in range(2)]
        assert again[0] == again[1]
        abatch = await ahub.publish_batch("news", [{"data": "x"}, {"data": "y"}])
        apersonal = await ahub.publish_to_user("bob", {"hi": "again"}, type="ping")
        assert apersonal["channel"] == "@bob" and apersonal["type"] == "ping"
        page = await ahub.history("news", after=two["id"])
        assert [e["id"] for e in page["events"]] == [again[0]["id"]] + [e["id"] for e in abatch]

    async def token() -> str:  # a provider, asked on every request
        return s.token

    async with AsyncClient(s.url, token=token) as ahub:
        three = await ahub.publish("news", {"n": 5})
    with Client(s.url, token=lambda: s.token) as hub:
        assert hub.history("news", after=three["id"] - 1)["events"][0] == three
    history = s.history("news")
    assert [e["data"] for e in history] == [
        {"n": 1}, {"n": 2}, 0, 1, 2, {"n": 3}, {"n": 4}, "x", "y", {"n": 5}
    ]  # fmt: skip
    assert history[0] == one and history[1] == keyed[0]
    bob = Api(s.url).login("bob")
    mine = httpx.get(f"{s.url}/me/events", headers={"Authorization": f"Bearer {bob}"}).json()
    assert [e["id"] for e in mine["events"]] == [personal["id"], apersonal["id"]]


async def _writers_waiting_for_the_lock(database_url: str, count: int) -> list[int]:
    """The pids of writer backends waiting for the publish lock, once there are
    ``count`` of them."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = await sql(
            database_url,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'ssehub-writer' "
            "AND datname = current_database() AND wait_event_type = 'Lock' "
            "ORDER BY backend_start",
        )
        if len(rows) >= count:
            return [r[0] for r in rows]
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {count} writers waiting for the publish lock")


@pytest.fixture(scope="module")
def proxied(database_url: str) -> Iterator[tuple[Server, CuttableProxy]]:
    """A server whose database connections all go through a ``CuttableProxy``."""
    proxy, via_proxy = CuttableProxy.to(database_url)
    try:
        srv = Server(via_proxy, env={"SSEHUB_DB_POOL_SIZE": "4"}).start()
        try:
            yield srv, proxy
        finally:
            srv.stop()
    finally:
        proxy.close()


async def test_a_publish_answered_503_is_retried_with_the_same_key(
    proxied: tuple[Server, CuttableProxy], database_url: str
) -> None:
    srv, proxy = proxied
    s = Setup(srv, "pay")
    lock = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        tr = lock.transaction()
        await tr.start()
        await lock.execute("SELECT pg_advisory_xact_lock($1)", PUBLISH_LOCK)
        with Client(s.url, api_key=s.key) as hub:  # its own random Idempotency-Key
            answer = asyncio.create_task(asyncio.to_thread(hub.publish, "pay", {"n": 1}))
            (first,) = await _writers_waiting_for_the_lock(database_url, 1)
            proxy.cut(first)  # the writer hears nothing more: 503
            # The retry waits behind the first attempt, which is still queued.
            await _writers_waiting_for_the_lock(database_url, 2)
            await tr.commit()  # the first attempt commits first, then the retry
            event = await asyncio.wait_for(answer, 30)
    finally:
        await lock.close()
    history = s.history("pay")
    assert [(e["id"], e["data"]) for e in history] == [(event["id"], {"n": 1})]
    statuses = re.findall(r'"POST /channels/pay/events HTTP/1.1" (\d+)', srv.log())
    # 503 to the first attempt; 200 to the retry: the key's earlier event, stored
    # by the attempt that was answered 503 (a new key would have made a second).
    assert statuses == ["503", "200"], srv.log()[-2000:]


# -- streaming ----------------------------------------------------------------------------


async def test_stream_yields_events_and_notices_resumes_and_merges(server: Server) -> None:
    s = Setup(server, "news", "sport")
    with Client(s.url, api_key=s.key) as hub:
        news = [hub.publish("news", {"n": i}) for i in range(4)]
        sport = [hub.publish("sport", {"s": i}) for i in range(2)]
    async with AsyncClient(s.url, token=s.token) as ahub:
        items = await take(ahub.stream("news", last_event_id=news[1]["id"]), 2)
        assert [as_dict(e) for e in events_of(items)] == news[2:]
        # Replay first, then the live notice; one more event live.
        live = ahub.stream("news", last_event_id=news[-1]["id"])
        first = await asyncio.wait_for(anext(live), 10)
        assert first == Notice("ssehub.live", {"replayed": 0})
        more = await ahub.publish("news", {"n": "live"})
        assert as_dict(await asyncio.wait_for(anext(live), 10)) == more  # type: ignore[arg-type]
        await live.aclose()
        merged = await take(ahub.stream(["news", "sport"], last_event_id=0), 7)
        got = events_of(merged)
        assert sorted(e.id for e in got) == sorted(e["id"] for e in [*news, more, *sport])
        for channel in ("news", "sport"):  # in order per channel
            ids = [e.id for e in got if e.channel == channel]
            assert ids == sorted(ids)
        notices = [n for n in merged if isinstance(n, Notice)]
        assert notices and all(n.type == "ssehub.live" for n in notices)
        # No channel: the caller's subscriptions and personal channel.
        assert s.api.http.put("/me/subscriptions/sport", headers=s.admin).status_code == 201
        mine = await ahub.publish_to_user("admin", {"for": "me"})
        own = await take(ahub.stream(None, last_event_id=sport[-1]["id"]), 1)
        assert [as_dict(e) for e in events_of(own)] == [mine]
    with Client(s.url, token=s.token) as hub:  # the sync stream, replay only
        stream = hub.stream("news", last_event_id=news[0]["id"])
        replayed = [next(stream) for _ in range(4)]
        stream.close()
    assert [as_dict(e) for e in replayed if isinstance(e, Event)] == [*news[1:], more]


async def test_a_refused_stream_raises_instead_of_looping(server: Server) -> None:
    s = Setup(server, "news")
    refusals = [
        (AsyncClient(s.url, token="not-a-token"), "news", 401),
        (AsyncClient(s.url, api_key=s.key), "news", 403),  # API keys cannot open streams
        (AsyncClient(s.url, token=s.token), "no-such-channel", 404),
        (AsyncClient(s.url, token=s.token), ["news", "no-such-channel"], 404),
    ]
    for client, channels, status in refusals:
        async with client:
            with pytest.raises(SsehubError) as refused:
                await asyncio.wait_for(take(client.stream(channels), 1), 5)
            assert refused.value.status == status
    with Client(s.url, token="not-a-token") as hub, pytest.raises(SsehubError) as refused:
        next(hub.stream("news"))
    assert refused.value.status == 401


def test_username_for_matches_the_server() -> None:
    subjects = [
        "alice",
        "Bob_99.x-y",
        "ab",
        "auth0|5f7c8ec7c33c6c004bbafe82",
        "user@example.com",
        "日本語のユーザー",
        "x" * 64,
        "y" * 65,
        "a b/c:d" * 20,
    ]
    for subject in subjects:
        assert username_for(subject) == server_username_for(subject), subject
    assert re.fullmatch(r"alice-[0-9a-f]{8}", username_for("alice"))
    assert re.fullmatch(r"[A-Za-z0-9_.\-]{3,64}", username_for("a b/c:d" * 20))


# -- the client core: requests, retries and stream positions, without I/O ---------------


def test_core_retries_only_what_is_safe_to_repeat() -> None:
    """A keyed publish is repeated on a 503 (after its Retry-After) and on a
    lost connection, until its retries run out; a batch (no key) only when the
    connection never opened; history is asked once."""
    unavailable = httpx.Response(503, headers={"retry-after": "2"}, json={"detail": "busy"})
    lost, refused = httpx.ReadError("lost"), httpx.ConnectError("refused")
    keyed = _Retry(_publish("channels", "news", 1, "message", None), 2)
    assert keyed.after(unavailable) == 2.0
    assert 0 < keyed.after(lost) <= 0.75
    assert keyed.after(unavailable) is unavailable  # the last attempt's answer is final
    spent = _Retry(_publish("channels", "news", 1, "message", None), 0)
    with pytest.raises(httpx.ReadError):
        spent.after(lost)
    batch = _batch("news", [{"data": 1}])
    assert _Retry(batch, 5).after(unavailable) is unavailable
    with pytest.raises(SsehubError) as error:
        batch.result(unavailable)
    assert (error.value.status, error.value.detail) == (503, "busy")
    with pytest.raises(httpx.ReadError):
        _Retry(batch, 5).after(lost)
    assert 0 < _Retry(batch, 5).after(refused) <= 0.3
    with pytest.raises(httpx.ConnectError):
        _Retry(_history("news", 0, 10), 5).after(refused)


def test_core_builds_each_request_once_with_quoted_names() -> None:
    """A call is built once, so its retries carry the same Idempotency-Key;
    names are one quoted segment each; a batch's result is its events."""
    call = _publish("users", "../channels/x", {"a": 1}, "note", None)
    assert call.path == "/users/..%2Fchannels%2Fx/events"
    assert call.json == {"type": "note", "data": {"a": 1}}
    other = _publish("users", "bob", {}, "note", None)
    assert len({call.headers["Idempotency-Key"], other.headers["Idempotency-Key"]}) == 2
    given = _publish("channels", "..", {}, "note", "k-1")
    assert (given.path, given.headers) == ("/channels/%2E%2E/events", {"Idempotency-Key": "k-1"})
    batch = _batch("news", [{"data": 1}])
    assert batch.result(httpx.Response(201, json={"events": [{"id": 7}]})) == [{"id": 7}]
    history = _history("a/b", 3, 10)
    assert (history.method, history.path, history.params) == (
        "GET",
        "/channels/a%2Fb/events",
        {"after": 3, "limit": 10},
    )


def test_core_stream_skips_replays_follows_resets_and_paces_reconnects() -> None:
    def frame(id: int) -> ServerSentEvent:
        payload = {"id": id, "channel": "c", "type": "t", "data": id, "published_at": "now"}
        return ServerSentEvent(data=json.dumps(payload), id=str(id))

    state = _Stream("/stream", 5)
    auth = {"Authorization": "Bearer t"}
    assert state.headers(auth) == {**auth, "Last-Event-ID": "5"}
    assert [state.take(frame(id)) is None for id in (4, 5, 6, 6)] == [True, True, False, True]
    assert state.take(ServerSentEvent(data="")) is None  # a comment or the retry line
    reset = ServerSentEvent(event="ssehub.reset", data=json.dumps({"last_event_id": 2}))
    assert state.take(reset) == Notice("ssehub.reset", {"last_event_id": 2})
    assert isinstance(state.take(frame(3)), Event) and state.last_event_id == 3
    assert _Stream("/stream", None).headers(auth) == auth
    first, second = state.pause(), state.pause()
    assert 0.1 <= first <= 0.3 and 0.25 <= second <= 0.75
    assert state.connected(httpx.Response(503)) is False
    with pytest.raises(SsehubError) as refused:
        state.connected(httpx.Response(403, json={"detail": "no"}))
    assert refused.value.status == 403
    assert state.connected(httpx.Response(200)) is True
    assert 0.1 <= state.pause() <= 0.3  # an accepted connection restarts the backoff


# -- across a restart: the client's stream and the CLI's tail -----------------------------


class Lines:
    """A subprocess's stdout lines, read by a thread, waited for with deadlines."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(
            target=self._read, args=(self.process.stdout, self.lines), daemon=True
        ).start()
        threading.Thread(
            target=self._read, args=(self.process.stderr, self.stderr), daemon=True
        ).start()

    @staticmethod
    def _read(pipe: Any, into: list[str]) -> None:
        for line in pipe:
            into.append(line.rstrip("\n"))

    async def wait(self, count: int, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(
                    f"{self.process.args}: {len(self.lines)} lines of {count}; "
                    f"exit {self.process.poll()}; "
                    f"stderr:\n" + "\n".join(self.stderr)
                )
            await asyncio.sleep(0.05)
        return self.lines

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def _cli_env(url: str, **credentials: str) -> dict[str, str]:
    env = {"SSEHUB_URL": url, **credentials}
    for name in ("SSEHUB_API_KEY", "SSEHUB_TOKEN"):
        env.setdefault(name, "")
    return env


@pytest.fixture
def processes() -> Iterator[Callable[[list[str], dict[str, str]], Lines]]:
    started: list[Lines] = []

    def start(cmd: list[str], env: dict[str, str]) -> Lines:
        started.append(Lines(cmd, env))
        return started[-1]

    yield start
    for lines in started:
        lines.stop()


async def test_stream_and_tail_go_on_across_a_server_restart(
    server: Server, proxied: tuple[Server, CuttableProxy], processes
) -> None:
    a, b = server, proxied[0]  # two instances on one database; a is restarted
    s = Setup(a, "live")
    with Client(a.url, api_key=s.key) as hub:
        published = [hub.publish("live", {"n": 0})]
    ssehub = [sys.executable, "-m", "app.cli"]
    tails = {
        "ssehub tail, token": processes(
            [*ssehub, "tail", "live", "--from", "0"], _cli_env(a.url, SSEHUB_TOKEN=s.token)
        ),
        "ssehub-client tail, token": processes(
            [CLIENT_CLI, "tail", "live", "--from", "0"], _cli_env(a.url, SSEHUB_TOKEN=s.token)
        ),
        "ssehub tail, API key (history)": processes(
            [*ssehub, "tail", "live", "--from", "0"], _cli_env(a.url, SSEHUB_API_KEY=s.key)
        ),
    }
    got: list[Event | Notice] = []

    async def follow() -> None:
        async with AsyncClient(a.url, token=s.token) as ahub:
            async for item in ahub.stream("live"):  # no position: starts live
                got.append(item)

    follower = asyncio.create_task(follow())
    try:
        deadline = time.monotonic() + 10
        while not any(isinstance(i, Notice) for i in got):
            assert time.monotonic() < deadline, "the stream never went live"
            await asyncio.sleep(0.02)
        with Client(a.url, api_key=s.key) as hub:
            published.append(hub.publish("live", {"n": 1}))
        for lines in tails.values():
            await lines.wait(2)
        await asyncio.to_thread(a.stop)
        with Client(b.url, api_key=s.key) as hub:  # published while a is down
            published += [hub.publish("live", {"n": n}) for n in (2, 3)]
        await asyncio.to_thread(a.start)  # the same port again
        with Client(a.url, api_key=s.key) as hub:
            published.append(hub.publish("live", {"n": 4}))
        expected = [json.dumps(e, separators=(",", ":")) for e in published]
        assert published == s.history("live")
        for name, lines in tails.items():
            assert await lines.wait(len(published)) == expected, name
        deadline = time.monotonic() + 20
        while len(events_of(got)) < len(published) - 1:
            assert time.monotonic() < deadline, f"the stream has {events_of(got)}"
            await asyncio.sleep(0.02)
        assert [as_dict(e) for e in events_of(got)] == published[1:]  # no gap, no duplicate
        assert [n.type for n in got if isinstance(n, Notice)] == ["ssehub.live"] * 2
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


def test_cli_publish_prints_the_event(server: Server) -> None:
    """``ssehub publish`` and ``ssehub-client publish``: one CLI in two commands.
    The runs are independent: they run at once (each is a Python start-up)."""
    s = Setup(server, "news")
    env = {**os.environ, **_cli_env(s.url, SSEHUB_API_KEY=s.key)}
    ssehub, client = [sys.executable, "-m", "app.cli"], [CLIENT_CLI]
    paid = ["publish", "news", '{"id": 42, "state": "paid"}', "--type", "order.paid"]
    commands = {
        "ssehub": [*ssehub, *paid],
        "ssehub-client": [*client, *paid],
        "ssehub bad": [*ssehub, "publish", "news", "{not json"],
        "ssehub-client bad": [*client, "publish", "news", "{not json"],
        "keyed 1": [*client, "publish", "news", "7", "--key", "once"],
        "keyed 2": [*client, "publish", "news", "7", "--key", "once"],
        "refused": [*client, "publish", "elsewhere", "1"],
    }
    running = {
        name: subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    done = {name: (p.communicate(timeout=30), p.returncode) for name, p in running.items()}
    events = []
    for name in ("ssehub", "ssehub-client"):
        (out, err), code = done[name]
        assert code == 0, err
        event = json.loads(out)
        assert event["type"] == "order.paid" and event["data"] == {"id": 42, "state": "paid"}
        events.append(event)
        (_, err), code = done[f"{name} bad"]
        assert code != 0 and "not JSON" in err and "Traceback" not in err
    (out, err), code = done["keyed 1"]
    assert code == 0 and done["keyed 2"] == done["keyed 1"], err
    events.append(json.loads(out))
    (_, err), code = done["refused"]
    assert code != 0 and "403" in err and "Traceback" not in err
    assert s.history("news") == sorted(events, key=lambda e: e["id"])


# -- a position above the head, and names that are not names ------------------------------


def _next_within(items: Iterator[Event | Notice], timeout: float) -> Event | Notice | None:
    """``next(items)`` of a sync stream, or None if nothing came within ``timeout``
    (the blocked reader is left to its daemon thread)."""
    got: list[Event | Notice] = []
    reader = threading.Thread(target=lambda: got.append(next(items)), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else None


async def test_after_a_reset_notice_new_lower_ids_are_delivered(server: Server) -> None:
    """A position above every issued id (a restored database): the server says
    ``ssehub.reset`` and goes on from its head. The client's position must follow
    the notice, or every new event, whose id is lower, is skipped as seen."""
    s = Setup(server, "news")
    with Client(s.url, api_key=s.key) as hub:
        head_id = hub.publish("news", {"n": 0})["id"]
    above = head_id + 1000
    async with AsyncClient(s.url, token=s.token) as ahub:
        live = ahub.stream("news", last_event_id=above)
        notices = [await asyncio.wait_for(anext(live), 10) for _ in range(2)]
        assert [n.type for n in notices] == ["ssehub.reset", "ssehub.live"]
        assert isinstance(notices[0], Notice) and notices[0].data["last_event_id"] < above
        new = await ahub.publish("news", {"n": 1})
        got = await asyncio.wait_for(anext(live), 10)
        assert isinstance(got, Event) and as_dict(got) == new
        await live.aclose()
    with Client(s.url, token=s.token) as hub:
        stream = hub.stream("news", last_event_id=above)
        assert [_next_within(stream, 10).type for _ in range(2)] == [  # type: ignore[union-attr]
            "ssehub.reset",
            "ssehub.live",
        ]
        newer = hub.publish("news", {"n": 2})
        got = _next_within(stream, 10)
        assert isinstance(got, Event) and as_dict(got) == newer, got


async def test_tail_from_above_the_head_prints_new_events(server: Server, processes) -> None:
    s = Setup(server, "news")
    with Client(s.url, api_key=s.key) as hub:
        head_id = hub.publish("news", {"n": 0})["id"]
    tail = processes(
        [CLIENT_CLI, "tail", "news", "--from", str(head_id + 1000)],
        _cli_env(s.url, SSEHUB_TOKEN=s.token),
    )
    deadline = time.monotonic() + 20
    while not any("ssehub.live" in line for line in tail.stderr):
        assert time.monotonic() < deadline, tail.stderr
        await asyncio.sleep(0.05)
    with Client(s.url, api_key=s.key) as hub:
        new = hub.publish("news", {"n": 1})
    assert await tail.wait(1) == [json.dumps(new, separators=(",", ":"))]


async def test_a_name_with_slashes_cannot_reach_another_path(server: Server) -> None:
    """Every path segment is quoted: ``../users/bob`` is a (bad) channel name,
    not a way to publish to bob's personal channel, and a username cannot
    climb back to a channel. (The server decodes ``%2F`` before routing, so a
    name holding a slash matches no route: the page's fallback answers a POST
    there 405; ``..`` reaches the channel ``..``, which the key may not
    publish to: 403.)"""
    s = Setup(server, "news")
    s.api.register("bob")
    climbs = ["../users/bob", "..", "x/../../users/bob", "news/../../users/bob"]
    with Client(s.url, api_key=s.key) as hub:
        for name in climbs:
            with pytest.raises(SsehubError) as refused:
                hub.publish(name, {"to": "bob?"})
            assert refused.value.status in (403, 404, 405, 422), (name, refused.value)
        with pytest.raises(SsehubError) as refused:
            hub.publish_to_user("x/../../channels/news", {"to": "news?"})
        assert refused.value.status in (403, 404, 405, 422)
        with pytest.raises(SsehubError) as refused:
            hub.publish_batch("../users/bob", [{"data": 1}])
        assert refused.value.status in (403, 404, 405, 422)
    async with AsyncClient(s.url, api_key=s.key) as ahub:
        for name in climbs:
            with pytest.raises(SsehubError) as refused:
                await ahub.publish(name, {"to": "bob?"})
            assert refused.value.status in (403, 404, 405, 422), (name, refused.value)
        with pytest.raises(SsehubError) as refused:
            await ahub.publish_to_user("x/../../channels/news", {"to": "news?"})
        assert refused.value.status in (403, 404, 405, 422)
    bob = Api(s.url).login("bob")
    mine = httpx.get(f"{s.url}/me/events", headers={"Authorization": f"Bearer {bob}"}).json()
    assert mine["events"] == []
    assert s.history("news") == []
