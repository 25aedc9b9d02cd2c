"""Hostile clients against a real ``ssehub serve`` and a real Postgres.

One test per attack of the hardening issue ("nothing a client sends can
stall, exhaust or silently cut the service"), each named after the attack it
plays. A test connection to the test database plays the part of whatever the
attack needs to be slow or stuck: the publish lock held (as in
``tests/test_ordering.py``), a table locked, backends terminated. Settings are
kept small with ``start_server(**env)`` so that each attack is cheap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest

from app.db import asyncpg_dsn
from app.events.publisher import PUBLISH_LOCK
from tests.support import (
    ADMIN_PASSWORD,
    Api,
    Server,
    eventually,
    migrated_database,
    read_history,
    sql,
    wait_until,
)

T = TypeVar("T")
StartServer = Callable[..., Server]

# The connections an instance may open, by the application_name it gives them.
INSTANCE_CONNECTIONS = ("ssehub", "ssehub-orm", "ssehub-writer", "ssehub-listener")
# app.events.publisher.MAX_PENDING_EVENTS, written out: the old code has no bound.
MAX_PENDING_EVENTS = 20_000
BATCH = 1000  # the largest batch, and the most the writer takes into one transaction
LOGIN_LIMITS = {"SSEHUB_LOGIN_ATTEMPTS_PER_MINUTE": "10", "SSEHUB_TRUSTED_PROXIES": "127.0.0.1/32"}


# -- helpers -------------------------------------------------------------------


@asynccontextmanager
async def attacker(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of our own to the test database (closing it releases its locks)."""
    conn = await asyncpg.connect(
        asyncpg_dsn(database_url), server_settings={"application_name": "ssehub-test-attacker"}
    )
    try:
        yield conn
    finally:
        await conn.close()


async def within(timeout: float, check: Callable[[], bool]) -> bool:
    """Whether ``check()`` comes true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def writer_waiting_for_a_lock(conn: asyncpg.Connection) -> int | None:
    """The pid of a writer whose statement waits for a lock, if there is one."""
    pid: int | None = await conn.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'ssehub-writer' "
        "AND datname = current_database() AND wait_event_type = 'Lock'"
    )
    return pid


async def terminate_writer(conn: asyncpg.Connection) -> None:
    killed = await conn.fetch(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'ssehub-writer' AND datname = current_database()"
    )
    assert killed and all(row[0] for row in killed)


def client(srv: Server, timeout: float = 30) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=srv.url, timeout=timeout)


def create_channel(api: Api, admin: dict[str, str], name: str, **fields: Any) -> None:
    r = api.http.post("/channels", json={"name": name, **fields}, headers=admin)
    assert r.status_code == 201, r.text


def raw_post(
    srv: Server, path: str, headers: dict[str, str], body: bytes = b"", declared: int | None = None
) -> tuple[int, bytes]:
    """POST over a bare socket, where httpx would refuse to misbehave: a head that
    announces ``declared`` bytes and sends only ``body``, or a header httpx will
    not send. The status and body of the answer, which must come within 2 s."""
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: ssehub.test",
        "Content-Type: application/json",
        f"Content-Length: {len(body) if declared is None else declared}",
        *(f"{name}: {value}" for name, value in headers.items()),
        "",
        "",
    ]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=2) as sock:
        sock.sendall("\r\n".join(lines).encode() + body)
        data = b""
        try:
            while not _complete(data):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise AssertionError(f"no answer to {path} within 2 s: the server waits") from None
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head, f"connection closed without an answer to {path}"
    return int(head.split(b" ", 2)[1]), answer


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    return bool(sep) and len(body) >= (int(length[1]) if length else 0)


# -- rights before work ----------------------------------------------------------


def test_publish_without_rights_announcing_8mb_and_sending_nothing(
    api: Api, server: Server
) -> None:
    """A caller who may not publish announces a batch of ~8 MB (under the batch
    limit) and never sends it: it is refused at once, not after the server has
    waited for the body."""
    admin = api.admin()
    create_channel(api, admin, "news")
    create_channel(api, admin, "vip", private=True)
    bob = api.user("bob")
    declared = 8_000_000  # under SSEHUB_MAX_BATCH_BYTES (8 MiB): no 413 to hide behind
    cases = [
        ("/channels/news/events/batch", bob, 403),
        ("/channels/vip/events/batch", bob, 404),
        ("/channels/news/events/batch", {}, 401),
    ]
    for path, headers, expected in cases:
        status, answer = raw_post(server, path, headers, declared=declared)  # within 2 s
        assert status == expected and b'"detail"' in answer, (path, status, answer)


async def test_publish_without_rights_while_the_ordering_lock_is_held(
    server: Server, database_url: str
) -> None:
    """While the publish lock is held elsewhere, a non-admin's publish is refused
    at once instead of queueing behind it; an admin's waits and then succeeds."""
    api = Api(server.url)
    admin = api.admin()
    create_channel(api, admin, "locked")
    bob = api.user("bob")
    async with client(server) as http, attacker(database_url) as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", PUBLISH_LOCK)
        admins = asyncio.create_task(
            http.post("/channels/locked/events", json={"data": "admin"}, headers=admin)
        )
        try:
            await eventually(
                lambda: writer_waiting_for_a_lock(conn), "the admin's publish waits", 5
            )
            try:
                r = await asyncio.wait_for(
                    http.post("/channels/locked/events", json={"data": "bob"}, headers=bob), 2
                )
            except TimeoutError:
                raise AssertionError("a non-admin's publish waited for the ordering lock") from None
            assert r.status_code == 403, r.text
            assert not admins.done(), "the admin's publish finished while the lock was held"
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", PUBLISH_LOCK)
        published = await asyncio.wait_for(admins, 10)
    assert published.status_code == 201, published.text
    assert [e["data"] for e in read_history(api.base_url, admin, "locked")] == ["admin"]


async def test_flood_of_batches_behind_a_held_ordering_lock(
    server: Server, database_url: str
) -> None:
    """An admin fires batches while the writer is stuck: past the bound on
    waiting events the answer is 503 with Retry-After at once, not unbounded
    memory and latency; everything accepted is published exactly once."""
    api = Api(server.url)
    admin = api.admin()
    create_channel(api, admin, "flood")
    # MAX_PENDING_EVENTS may wait, and one more batch if the writer took it into
    # its stuck transaction before the bound was reached.
    waiting_batches = MAX_PENDING_EVENTS // BATCH
    batches = waiting_batches + 5
    answers: dict[int, httpx.Response] = {}

    async def send(http: httpx.AsyncClient, n: int) -> None:
        body = {"events": [{"data": n}] * BATCH}
        answers[n] = await http.post("/channels/flood/events/batch", json=body, headers=admin)

    limits = httpx.Limits(max_connections=batches)
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http,
        attacker(database_url) as conn,
    ):
        await conn.execute("SELECT pg_advisory_lock($1)", PUBLISH_LOCK)
        tasks = [asyncio.create_task(send(http, n)) for n in range(batches)]
        try:
            if await within(6, lambda: len(answers) >= batches - waiting_batches - 1):
                await asyncio.sleep(1)  # for a last refusal on its way
            early = dict(answers)  # answered while the lock was still held
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", PUBLISH_LOCK)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    codes = Counter(r.status_code for r in answers.values())
    assert early, f"nothing was refused while the writer was stuck; then: {codes}"
    assert {r.status_code for r in early.values()} == {503}, codes
    for r in early.values():
        assert int(r.headers["retry-after"]) >= 1 and r.json()["detail"]
    created = sorted(n for n, r in answers.items() if r.status_code == 201)
    assert sorted(early) == sorted(set(answers) - set(created))
    assert waiting_batches <= len(created) <= waiting_batches + 1, codes
    stored = Counter(e["data"] for e in read_history(api.base_url, admin, "flood"))
    assert stored == dict.fromkeys(created, BATCH)


# -- login floods ----------------------------------------------------------------


def test_password_guessing_on_one_username_and_from_one_address(
    start_server: StartServer,
) -> None:
    """Guessing one user's password from many addresses, and many users' from one
    address: the 11th failure in a minute is 429 with Retry-After; a user who
    logs in rightly from elsewhere is not locked out."""
    srv = start_server(**LOGIN_LIMITS)
    api = Api(srv.url)
    api.register("victim")
    api.register("other")

    def login(username: str, password: str, address: str) -> httpx.Response:
        return api.http.post(
            "/auth/token",
            data={"username": username, "password": password},
            headers={"X-Forwarded-For": address},
        )

    def guess(attempts: list[tuple[str, str]]) -> httpx.Response:
        """Ten wrong passwords, each refused with 401, then an eleventh: its answer."""
        for username, address in attempts[:10]:
            assert login(username, "wrong-password", address).status_code == 401
        username, address = attempts[10]
        return login(username, "wrong-password", address)

    one_username = [("victim", f"198.51.100.{i}") for i in range(11)]
    one_address = [(f"user-{i}", "203.0.113.5") for i in range(11)]
    # The two guessers share no username and no address: run them side by side.
    with cf.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(guess, [one_username, one_address]))
    for r in answers:
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1

    assert login("other", "password-123", "192.0.2.1").status_code == 200


# Wrong logins from CLIENTS concurrent clients for SECONDS, each with a fresh
# username and forwarded address (so no rate limit stops them), as fast as the
# server answers. A process of its own (importing only httpx, so it starts at
# once), so that its work does not slow the probes measured beside it.
#
# Its clients do what a browser does when a kept-alive connection fails before
# any answer: send the request once more, on a new connection. They stop
# reusing a connection idle for 2 s, well before the server's 5 s keep-alive
# close, so that race is not one of those failures. A few remain on a loaded
# machine (3 of 219 requests in one CI run; 2 of 652 in a run here while
# packages installed, neither reaching the app's access log; none in dozens
# of other runs): each is counted as "retried: <error>", and a request that
# fails twice is a failure.
FLOOD_CLIENTS = 60
FLOOD = """
import asyncio, collections, json, sys, time
import httpx

url, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])


async def main():
    got = collections.Counter()
    limits = httpx.Limits(max_connections=clients, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def login(client, form, forwarded):
            r = await client.post("/auth/token", data=form, headers=forwarded)
            got[str(r.status_code)] += 1

        async def one(c):
            n = 0
            while time.monotonic() < deadline:
                n += 1
                form = {"username": f"flood-{c}-{n}", "password": "wrong-password"}
                forwarded = {"X-Forwarded-For": f"10.{c}.{n // 250 % 250}.{n % 250 + 1}"}
                try:
                    await login(http, form, forwarded)
                    continue
                except httpx.TransportError as exc:
                    got["retried: " + type(exc).__name__] += 1
                try:
                    async with httpx.AsyncClient(base_url=url, timeout=60) as fresh:
                        await login(fresh, form, forwarded)
                except httpx.HTTPError as exc:
                    got[type(exc).__name__] += 1

        print(json.dumps({"began": time.time()}), flush=True)
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(one(c) for c in range(clients)))
    print(json.dumps({"ended": time.time(), "got": got}), flush=True)


asyncio.run(main())
"""


def test_login_flood_with_fresh_usernames_and_addresses(start_server: StartServer) -> None:
    """Sixty clients send wrong logins as fast as they are answered, each with a
    new username and address: hashing stays bounded (429 past it, never 500),
    and meanwhile /readyz and the API answer within a second, every time."""
    srv = start_server(**LOGIN_LIMITS, SSEHUB_DB_POOL_SIZE="4")
    admin = Api(srv.url).admin()
    probes: list[tuple[float, str, int, float]] = []
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD, srv.url, str(FLOOD_CLIENTS), "5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flood.stdout is not None
    began = json.loads(flood.stdout.readline())["began"]
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        while flood.poll() is None:
            for path, headers in (("/readyz", {}), ("/channels", admin)):
                started = time.monotonic()
                r = http.get(path, headers=headers)
                probes.append((time.time(), path, r.status_code, time.monotonic() - started))
            time.sleep(0.1)
    report = json.loads(flood.stdout.readline())
    ended, got = report["ended"], report["got"]
    during = [p for p in probes if began + 0.5 <= p[0] <= ended]
    assert len(during) >= 20, "too few probes during the flood"
    assert {status for _, _, status, _ in during} == {200}, during
    slowest = max(elapsed for *_, elapsed in during)
    assert slowest < 1.0, f"a probe took {slowest:.2f}s during the flood ({got})"
    assert got.get("401", 0) > 0 and got.get("429", 0) > 0, got
    answers = {k: n for k, n in got.items() if k.isdigit()}
    # Every request answered, at the latest on its retry, and never with a 500.
    assert set(answers) <= {"401", "429"}, got
    retried = sum(n for k, n in got.items() if k.startswith("retried: "))
    assert all(k.isdigit() or k.startswith("retried: ") for k in got), got
    assert retried <= max(5, sum(answers.values()) // 20), got


# -- text Postgres cannot store ----------------------------------------------------


def test_nul_and_lone_surrogates_on_every_route(api: Api, server: Server) -> None:
    """A NUL in every path, query and body field that reaches SQL, and a lone
    surrogate in the body fields: 400/404/422, never 500, and nothing changes."""
    admin = api.admin()
    create_channel(api, admin, "news", description="old")
    create_channel(api, admin, "vip", private=True)
    api.user("bob")
    assert api.http.put("/me/subscriptions/news", headers=admin).status_code == 201
    # One connection per request: a 500 may leave its connection unusable.
    json_type = {**admin, "Content-Type": "application/json", "Connection": "close"}
    bad_descriptions = [b"a\\u0000b", b"a\\ud800b"]  # raw JSON escapes, as sent
    requests: list[tuple[str, str, bytes | None]] = [
        ("GET", "/channels/news%00", None),
        ("PATCH", "/channels/news%00", b'{"description": "new"}'),
        ("DELETE", "/channels/news%00", None),
        ("GET", "/channels/news%00/events", None),
        ("GET", "/channels/vip%00/members", None),
        ("PUT", "/channels/vip/members/bob%00", None),
        ("DELETE", "/channels/vip/members/bob%00", None),
        ("PUT", "/me/subscriptions/news%00", None),
        ("DELETE", "/me/subscriptions/news%00", None),
        ("GET", "/channels?after=news%00", None),
    ]
    for text in bad_descriptions:
        requests.append(("POST", "/channels", b'{"name": "fresh", "description": "' + text + b'"}'))
        requests.append(("PATCH", "/channels/news", b'{"description": "' + text + b'"}'))
    wrong: list[tuple[str, str, bytes | None, int | str]] = []
    for method, path, body in requests:
        try:
            r = api.http.request(method, path, content=body, headers=json_type)
        except httpx.HTTPError as exc:
            wrong.append((method, path, body, type(exc).__name__))
            continue
        if r.status_code not in (400, 404, 422) or not r.json()["detail"]:
            wrong.append((method, path, body, r.status_code))
    assert not wrong, f"{len(wrong)} of {len(requests)} refused wrongly: {wrong}"

    # A NUL in a header: httpx refuses to send it (h11's LocalProtocolError), and
    # from a bare socket the server's HTTP parser refuses it (400, in plain text)
    # before the app sees it. Either way it is no 500 and publishes nothing.
    with pytest.raises(httpx.LocalProtocolError):
        api.http.post("/channels/news/events", json={}, headers={"Idempotency-Key": "k\x00"})
    key = {**admin, "Idempotency-Key": "k\x00"}
    status, answer = raw_post(server, "/channels/news/events", key, b'{"data": 1}')
    assert status == 400, (status, answer)

    channel = api.http.get("/channels/news", headers=admin)
    assert channel.status_code == 200 and channel.json()["description"] == "old"
    assert api.http.get("/channels/fresh", headers=admin).status_code == 404
    assert api.http.get("/channels/vip/members", headers=admin).json() == []
    subscriptions = api.http.get("/me/subscriptions", headers=admin).json()
    assert [s["channel"] for s in subscriptions] == ["news"]
    assert read_history(api.base_url, admin, "news") == []


# -- idempotency and failure semantics -----------------------------------------------


def test_empty_idempotency_key(api: Api) -> None:
    """An empty Idempotency-Key (a client whose key variable came out empty) would
    make every such client's publishes collide on one key: it is a 400, and
    nothing is published."""
    admin = api.admin()
    create_channel(api, admin, "news")
    r = api.http.post(
        "/channels/news/events", json={"data": 1}, headers={**admin, "Idempotency-Key": ""}
    )
    assert r.status_code == 400 and r.json()["detail"], (r.status_code, r.text)
    assert read_history(api.base_url, admin, "news") == []


async def test_writer_terminated_while_keyed_publishes_wait(
    server: Server, database_url: str
) -> None:
    """The writer's backend is terminated (as by a database shutdown) while a
    transaction of coalesced keyed publishes waits inside its statement. Such an
    error may come after a commit, so it is no rollback: every one is answered
    503 with Retry-After at once, none is retried behind the client's back, and
    the client's retries with their keys publish each exactly once."""
    api = Api(server.url)
    admin = api.admin()
    create_channel(api, admin, "keyed")
    keys = [f"key-{n}" for n in range(6)]
    answers: dict[str, httpx.Response] = {}

    async def publish(http: httpx.AsyncClient, key: str) -> httpx.Response:
        headers = {**admin, "Idempotency-Key": key}
        return await http.post("/channels/keyed/events", json={"data": key}, headers=headers)

    async def record(http: httpx.AsyncClient, key: str) -> None:
        answers[key] = await publish(http, key)

    async with client(server) as http, attacker(database_url) as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", PUBLISH_LOCK)
        tasks = [asyncio.create_task(record(http, keys[0]))]
        try:
            # The first publish goes into the writer's statement alone; the others
            # queue behind it and are coalesced into the next one.
            first = await eventually(lambda: writer_waiting_for_a_lock(conn), "writer waits", 5)
            tasks += [asyncio.create_task(record(http, key)) for key in keys[1:]]
            await asyncio.sleep(0.5)
            await terminate_writer(conn)
            assert await within(3, lambda: len(answers) == 1), "the first publish is answered"

            async def next_statement() -> int | None:
                pid = await writer_waiting_for_a_lock(conn)
                return pid if pid not in (None, first) else None

            await eventually(next_statement, "the coalesced publishes wait in the writer", 5)
            await terminate_writer(conn)
            await within(3, lambda: len(answers) == len(keys))
            early = dict(answers)  # answered while the lock was still held
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", PUBLISH_LOCK)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        codes = {key: r.status_code for key, r in answers.items()}
        assert sorted(early) == keys, f"not answered while the lock was held; then: {codes}"
        assert set(codes.values()) == {503}, codes
        assert all(r.headers.get("retry-after") for r in answers.values())
        retries = await asyncio.gather(*(publish(http, key) for key in keys))
    assert {r.status_code for r in retries} <= {200, 201}, [r.text for r in retries]
    assert sorted(e["data"] for e in read_history(api.base_url, admin, "keyed")) == keys


def test_database_restarts_under_load(server: Server, database_url: str) -> None:
    """Every backend of the database is terminated, five times, while clients
    read, log in and publish: each answer is a success or a 503 with
    Retry-After, never a 500, and the instance is ready again by itself."""
    api = Api(server.url)
    admin = api.admin()
    create_channel(api, admin, "news")
    stop = threading.Event()
    seen: list[tuple[str, int, str | None]] = []
    answered_at: list[float] = []

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=15, headers=admin) as http:
            login = {"username": "admin", "password": ADMIN_PASSWORD}
            calls: dict[str, Callable[[], httpx.Response]] = {
                "channels": lambda: http.get("/channels"),
                "me": lambda: http.get("/users/me"),
                "token": lambda: http.post("/auth/token", data=login),
                "publish": lambda: http.post("/channels/news/events", json={"data": 1}),
            }
            while not stop.is_set():
                for name, call in calls.items():
                    try:
                        r = call()
                        seen.append((name, r.status_code, r.headers.get("retry-after")))
                    except httpx.HTTPError as exc:  # a hang, or a connection cut unanswered
                        seen.append((name, 0, type(exc).__name__))
                    answered_at.append(time.monotonic())

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        killed_at = []
        for _ in range(5):
            time.sleep(0.6)
            killed_at.append(time.monotonic())
            asyncio.run(
                sql(
                    database_url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
            )
        wait_until(lambda: api.http.get("/readyz").status_code == 200, "ready again")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    expected = {"channels": 200, "me": 200, "token": 200, "publish": 201}
    wrong = [s for s in seen if s[1] != expected[s[0]] and not (s[1] == 503 and s[2])]
    assert not wrong, f"{len(wrong)} of {len(seen)} answers were wrong: {wrong[:10]}"
    during = [t for t in answered_at if killed_at[0] <= t <= killed_at[-1]]
    assert len(during) >= 4, "too little load while backends were terminated to mean anything"


# -- budgets and timeouts -----------------------------------------------------------


@pytest.fixture
def lone_instance(postgres_server_url: str) -> Iterator[tuple[Server, str]]:
    """An instance with SSEHUB_DB_POOL_SIZE=4, alone on a migrated database of its
    own (with the admin), and that database's URL: its connections are counted
    exactly, where the shared server of other tests would use the same names."""
    with migrated_database(postgres_server_url, "ssehub_budget") as url:
        srv = Server(url, env={"SSEHUB_DB_POOL_SIZE": "4"}).start()
        try:
            yield srv, url
        finally:
            srv.stop()


async def instance_connections(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = ANY($1::text[])",
        list(INSTANCE_CONNECTIONS),
    )
    return count


async def test_load_stays_within_the_connection_budget(lone_instance: tuple[Server, str]) -> None:
    """Concurrent REST calls, history reads, stream openings with a replay and
    publishes, with SSEHUB_DB_POOL_SIZE=4: the instance never holds more than
    its budget plus its writer and its listener."""
    srv, database_url = lone_instance
    async with attacker(database_url) as conn:
        api = Api(srv.url)
        admin = api.admin()
        create_channel(api, admin, "news")
        batch = {"events": [{"data": i} for i in range(20)]}
        assert api.http.post("/channels/news/events/batch", json=batch, headers=admin).is_success
        statuses: Counter[int] = Counter()
        start = time.monotonic()

        def done() -> bool:
            """At least 3 s and 60 calls (a busy CI machine is slow), at most 20 s."""
            elapsed = time.monotonic() - start
            return elapsed > 20 or (elapsed > 3 and sum(statuses.values()) >= 60)

        async def loop(call: Callable[[httpx.AsyncClient], Awaitable[int]]) -> None:
            async with client(srv) as http:
                while not done():
                    statuses[await call(http)] += 1

        async def rest(http: httpx.AsyncClient) -> int:
            for path in ("/channels", "/channels/news", "/users/me"):
                r = await http.get(path, headers=admin)
                if r.status_code != 200:
                    return r.status_code
            return (await http.put("/me/subscriptions/news", headers=admin)).status_code

        async def read_pages(http: httpx.AsyncClient) -> int:
            return (await http.get("/channels/news/events?after=0", headers=admin)).status_code

        async def open_stream(http: httpx.AsyncClient) -> int:
            headers = {**admin, "Last-Event-ID": "0"}
            async with http.stream("GET", "/channels/news/stream", headers=headers) as r:
                if r.status_code == 200:
                    async for chunk in r.aiter_bytes():
                        if b"ssehub.live" in chunk:
                            break
                return r.status_code

        async def publish(http: httpx.AsyncClient) -> int:
            r = await http.post("/channels/news/events", json={"data": "x"}, headers=admin)
            return r.status_code

        samples: list[int] = []

        async def sample() -> None:
            while not done():
                samples.append(await instance_connections(conn))
                await asyncio.sleep(0.05)

        await asyncio.gather(
            sample(),
            *(loop(rest) for _ in range(6)),
            *(loop(read_pages) for _ in range(8)),
            *(loop(open_stream) for _ in range(4)),
            *(loop(publish) for _ in range(4)),
        )
    assert set(statuses) <= {200, 201}, statuses
    assert sum(statuses.values()) >= 60, "too little load to mean anything"
    assert max(samples) <= 4 + 2, f"the instance held {max(samples)} connections"


async def test_table_lock_leaves_requests_no_connection(
    start_server: StartServer, database_url: str
) -> None:
    """Someone holds an exclusive lock on ``channels`` (up to 12 s), so every request
    that lists channels blocks and the small pool (SSEHUB_DB_POOL_SIZE=2) runs
    dry: the waiting requests get 503 within their acquire or query timeout,
    not a hang and not a 500, and 200 again once the lock is gone."""
    srv = start_server(SSEHUB_DB_POOL_SIZE="2")
    admin = Api(srv.url).admin()
    timings: list[tuple[int, float, str | None]] = []

    async def list_channels(http: httpx.AsyncClient) -> None:
        started = time.monotonic()
        r = await http.get("/channels", headers=admin)
        timings.append((r.status_code, time.monotonic() - started, r.headers.get("retry-after")))

    async with client(srv, timeout=60) as http, attacker(database_url) as conn:
        assert (await http.get("/channels", headers=admin)).status_code == 200
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE channels IN ACCESS EXCLUSIVE MODE")
        locked_at = time.monotonic()
        tasks = [asyncio.create_task(list_channels(http)) for _ in range(4)]
        try:
            await asyncio.wait(tasks, timeout=12)
        finally:
            await transaction.rollback()
        await asyncio.gather(*tasks)
        held = time.monotonic() - locked_at
        after = await http.get("/channels", headers=admin)
    assert all(status == 503 and retry for status, _, retry in timings), (timings, held)
    assert max(elapsed for _, elapsed, _ in timings) < 11.5, timings
    assert after.status_code == 200, after.text


async def test_stuck_writer_takes_the_instance_out_of_its_load_balancer(
    server: Server, database_url: str
) -> None:
    """An exclusive lock on ``events`` keeps an admin's publish waiting in the
    writer: /readyz turns 503 within 7 s (this instance cannot publish), and
    200 again soon after the lock is gone; the publish then succeeds."""
    api = Api(server.url)
    admin = api.admin()
    create_channel(api, admin, "news")

    async def readiness(http: httpx.AsyncClient, wanted: int) -> bool:
        return (await http.get("/readyz")).status_code == wanted

    async with client(server) as http, attacker(database_url) as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        locked_at = time.monotonic()
        publish = asyncio.create_task(
            http.post("/channels/news/events", json={"data": "stuck"}, headers=admin)
        )
        try:
            await eventually(lambda: readiness(http, 503), "/readyz says 503", 7)
            not_ready_after = time.monotonic() - locked_at
            assert not publish.done(), "the publish finished while events was locked"
        finally:
            await transaction.rollback()
        released_at = time.monotonic()
        await eventually(lambda: readiness(http, 200), "/readyz says 200 again", 5)
        ready_again_after = time.monotonic() - released_at
        published = await asyncio.wait_for(publish, 10)
    assert not_ready_after < 7 and ready_again_after < 5
    assert published.status_code == 201, published.text


def test_history_of_huge_events_is_paged_by_bytes(api: Api) -> None:
    """Sixty events of 60 KB each, asked for with limit=1000: a page holds about
    1 MiB (plus one event), not 3.6 MB, and the pages together hold every event
    once, in order."""
    admin = api.admin()
    create_channel(api, admin, "big")
    events = [{"data": f"{i:02d}" + "x" * 60_000} for i in range(60)]
    r = api.http.post("/channels/big/events/batch", json={"events": events}, headers=admin)
    assert r.status_code == 201, r.text
    ids = [e["id"] for e in r.json()["events"]]
    first = api.http.get("/channels/big/events?limit=1000", headers=admin).json()
    assert 1 <= len(first["events"]) <= 18, len(first["events"])
    assert first["next_after"] == first["events"][-1]["id"]
    got = read_history(api.base_url, admin, "big")
    assert [e["id"] for e in got] == ids
    assert [e["data"] for e in got] == [e["data"] for e in events]
