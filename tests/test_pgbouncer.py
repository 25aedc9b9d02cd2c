"""ssehub behind a real PgBouncer in transaction mode.

``SSEHUB_DATABASE_URL`` goes through PgBouncer (pool_mode = transaction: a
client's next transaction may run on another server connection, so nothing
may stay prepared and LISTEN cannot work there); ``SSEHUB_LISTEN_DATABASE_URL``
is the direct connection, for LISTEN and migrations. Everything must work:
the CLI, two instances, publishing, streams, enqueue, retention, with no
prepared-statement error anywhere.

Debian's ``pgbouncer`` refuses to run as root: as root it is started with
``-u postgres`` (for the embedded Postgres, which listens only on a Unix
socket, as the user who owns the socket's directory), its files in a
directory that user can read.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from alembic.script import ScriptDirectory

from app.cli import alembic_config
from app.db import asyncpg_dsn
from tests.support import (
    ROOT,
    TEST_SECRET,
    Api,
    Server,
    create_database,
    drop_database,
    free_port,
    postgres_address,
    sql,
    unique_name,
    wait_until,
)
from tests.support.roles import (
    SESSION_SHADOWS,
    SHADOWS,
    assert_nothing_ran_as_another_role,
    attacker,
)
from tests.support.sse import SseStream

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
ADMIN = {"SSEHUB_ADMIN_USERNAME": "boss", "SSEHUB_ADMIN_PASSWORD": "boss-password-1"}
CONFIG = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/userlist.txt
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
"""


@dataclass
class PgBouncer:
    """``pgbouncer`` in front of the Postgres of ``server_url`` (its host and port)."""

    server_url: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    directory: Path | None = None

    def url(self, database_url: str) -> str:
        """``database_url`` (same user, same database) through this PgBouncer."""
        parts = urlsplit(database_url)
        return parts._replace(netloc=f"{parts.username}@127.0.0.1:{self.port}", query="").geturl()

    def start(self, timeout: float = 15) -> PgBouncer:
        parts = urlsplit(self.server_url)
        host, port = postgres_address(self.server_url)
        self.directory = Path(tempfile.mkdtemp(prefix="ssehub-pgbouncer-"))
        self.directory.chmod(0o755)
        (self.directory / "userlist.txt").write_text(f'"{parts.username}" ""\n')
        (self.directory / "pgbouncer.ini").write_text(
            CONFIG.format(
                host=host,
                port=port,
                listen_port=self.port,
                directory=self.directory,
            )
        )
        for name in ("userlist.txt", "pgbouncer.ini"):
            (self.directory / name).chmod(0o644)
        cmd = [PGBOUNCER, str(self.directory / "pgbouncer.ini")]
        if os.geteuid() == 0:  # as the user who may open the socket's directory, if any
            cmd[1:1] = ["-u", Path(host).owner() if host.startswith("/") else "postgres"]
        with (self.directory / "pgbouncer.log").open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            wait_until(self._answering, lambda: f"pgbouncer to answer:\n{self.log()}", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _answering(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited:\n{self.log()}")
        return asyncio.run(self._answers())

    async def _answers(self) -> bool:
        try:
            conn = await connect(self.url(self.server_url), timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        try:
            return bool(await conn.fetchval("SELECT 1") == 1)
        finally:
            await conn.close()

    def log(self) -> str:
        path = self.directory / "pgbouncer.log" if self.directory else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


async def connect(url: str, **options: Any) -> asyncpg.Connection:
    """An application's connection through PgBouncer: nothing kept prepared."""
    return await asyncpg.connect(asyncpg_dsn(url), statement_cache_size=0, **options)


@dataclass
class Setup:
    bouncer: PgBouncer
    direct: str  # the database, directly
    via: str  # the same through PgBouncer

    def env(self) -> dict[str, str]:
        return {"SSEHUB_DATABASE_URL": self.via, "SSEHUB_LISTEN_DATABASE_URL": self.direct}


@pytest.fixture(scope="module")
def behind(postgres_server_url: str) -> Iterator[Setup]:
    """PgBouncer, and a new database that nothing has migrated yet."""
    if not Path(PGBOUNCER).exists():
        pytest.skip("pgbouncer is not installed (.ci/run installs it)")
    bouncer = PgBouncer(postgres_server_url).start()
    name = unique_name("ssehub_pgbouncer")
    direct = create_database(postgres_server_url, name)
    try:
        yield Setup(bouncer, direct, bouncer.url(direct))
    finally:
        bouncer.stop()
        drop_database(postgres_server_url, name)


def _cli(setup: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={**os.environ, "SSEHUB_SECRET_KEY": TEST_SECRET, **ADMIN, **setup.env()},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_the_cli_behind_pgbouncer(behind: Setup) -> None:
    """Each command is a new process whose statements are named like the last
    one's: through transaction pooling they land on a server connection that
    still holds the previous process's, unless nothing is kept prepared."""
    for _ in range(2):
        done = _cli(behind, "create-admin", "boss")
        assert done.returncode == 0, done.stderr
    head = ScriptDirectory.from_config(alembic_config(behind.direct)).get_current_head()
    rows = asyncio.run(sql(behind.direct, "SELECT version_num FROM public.alembic_version"))
    assert [r[0] for r in rows] == [head]  # migrated, on the direct connection
    for _ in range(2):
        done = _cli(behind, "api-key", "create", "backend", "--publish", "news")
        assert done.returncode == 0 and done.stdout.startswith("ssehub_"), done.stderr


def _server(setup: Setup) -> Server:
    env = {
        "SSEHUB_LISTEN_DATABASE_URL": setup.direct,
        "SSEHUB_RETENTION_INTERVAL_SECONDS": "0.2",
        "SSEHUB_DB_POOL_SIZE": "6",
        **ADMIN,
    }
    return Server(setup.via, env=env)


async def test_two_instances_behind_pgbouncer_attack_shadowing_in_public_runs_nothing(
    behind: Setup,
) -> None:
    """Everything works through PgBouncer while a role that may create in
    ``public`` has shadowed ``=``, ``||`` and built-ins there
    (tests/test_database_roles.py). PgBouncer passes on no ``search_path`` at
    connect: ssehub's sessions start with the role's default that ``migrate``
    set, and run none of the attacker's code."""
    async with attacker(behind.direct, SHADOWS + SESSION_SHADOWS) as name:
        servers = [_server(behind), _server(behind)]
        try:
            for srv in servers:
                await asyncio.to_thread(srv.start)
            await asyncio.to_thread(_everything_on, behind, *servers)
        finally:
            for srv in servers:
                srv.stop()
        await assert_nothing_ran_as_another_role(behind.direct, name)
    for srv in servers:
        assert "prepared statement" not in srv.log()
        assert "Traceback" not in srv.log()


def test_serve_behind_pgbouncer_refuses_a_server_connection_that_searches_public(
    postgres_server_url: str,
) -> None:
    """A server connection PgBouncer opened before the role's default was set
    keeps searching ``public``: ``serve`` refuses to start on one, naming the
    fix, rather than run there."""
    bouncer = PgBouncer(postgres_server_url).start()
    name = unique_name("ssehub_pgbouncer_stale")
    direct = create_database(postgres_server_url, name)
    setup = Setup(bouncer, direct, bouncer.url(direct))
    try:
        done = _cli(setup, "migrate")
        assert done.returncode == 0, done.stderr

        async def stale() -> str:
            await sql(direct, "ALTER ROLE CURRENT_USER IN DATABASE " + name + " RESET search_path")
            conn = await connect(setup.via)  # PgBouncer opens a server connection now
            try:
                path: str = await conn.fetchval("SHOW search_path")
                return path
            finally:
                await conn.close()

        assert "public" in asyncio.run(stale())
        srv = _server(setup)
        with pytest.raises(RuntimeError, match="exited early") as failed:
            srv.start()
        assert "searches" in str(failed.value) and "RECONNECT" in str(failed.value)
        assert "Traceback" not in str(failed.value)
    finally:
        bouncer.stop()
        drop_database(postgres_server_url, name)


def _everything_on(setup: Setup, a: Server, b: Server) -> None:
    api = Api(a.url)
    boss = {"Authorization": f"Bearer {api.login('boss', ADMIN['SSEHUB_ADMIN_PASSWORD'])}"}
    alice_name = "alice"
    alice = api.user(alice_name)
    for fields in ({"name": "news"}, {"name": "short", "max_events": 3}):
        r = api.http.post("/channels", json=fields, headers=boss)
        assert r.status_code == 201, r.text
    assert api.http.put("/me/subscriptions/news", headers=alice).status_code == 201
    stream_token = api.http.post("/auth/stream-token", headers=alice).json()["stream_token"]
    boss_token = api.http.post("/auth/stream-token", headers=boss).json()["stream_token"]
    mine = SseStream(f"{a.url}/stream?access_token={stream_token}")
    news = SseStream(f"{b.url}/channels/news/stream?access_token={boss_token}")
    for s in (mine, news):
        s.wait_for(lambda st: bool(st.notices("ssehub.live")))

    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(headers=boss, timeout=30) as http:
            for i in range(80):
                base = (a.url, b.url)[i % 2]
                kind = rng.randrange(6)
                if kind == 0:  # keys repeat: some publishes are answered with the first event
                    key = f"k{rng.randrange(40)}"
                    r = http.post(
                        f"{base}/channels/news/events",
                        json={"data": {"key": key}},
                        headers={"Idempotency-Key": key},
                    )
                elif kind == 1:
                    events = [{"type": "b", "data": j} for j in range(rng.randint(2, 5))]
                    r = http.post(f"{base}/channels/news/events/batch", json={"events": events})
                elif kind == 2:
                    r = http.post(f"{base}/users/{alice_name}/events", json={"data": i})
                elif kind == 3:
                    r = http.get(
                        f"{base}/channels/news/events", params={"after": rng.randrange(50)}
                    )
                elif kind == 4:
                    r = http.get(f"{base}/channels", headers=boss)
                else:
                    r = http.get(f"{base}/me/subscriptions", headers=alice)
                with lock:
                    statuses[r.status_code] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()

    async def enqueue() -> None:  # the application's own transaction, through PgBouncer too
        conn = await connect(setup.via)
        try:
            for i in range(10):
                async with conn.transaction():
                    await conn.execute(
                        "SELECT public.ssehub_enqueue('news', 'sql', $1::jsonb)",
                        json.dumps({"sql": i}),
                    )
                    await conn.execute(
                        "SELECT public.ssehub_enqueue($1, 'sql', '{}'::jsonb)", f"@{alice_name}"
                    )
        finally:
            await conn.close()

    asyncio.run(enqueue())
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 201}, statuses
    assert sum(statuses.values()) == 320

    r = api.http.post(
        "/channels/short/events/batch",
        json={"events": [{"data": i} for i in range(10)]},
        headers=boss,
    )
    assert r.status_code == 201, r.text
    kept: list[Any] = []

    def trimmed() -> bool:
        kept[:] = api.http.get("/channels/short/events", headers=boss).json()["events"]
        return [e["data"] for e in kept] == [7, 8, 9]

    wait_until(trimmed, lambda: f'retention to trim "short" to its last 3 events: {kept}', 15)

    def inbox_empty() -> bool:
        return asyncio.run(sql(setup.direct, "SELECT count(*) FROM public.ssehub_inbox"))[0][0] == 0

    wait_until(inbox_empty, "the enqueued events moved", 15)
    history = _all(b.url, "/channels/news/events", boss)
    personal = _all(a.url, "/me/events", alice)
    assert sum(1 for e in history if e["type"] == "sql") == 10
    assert sum(1 for e in personal if e["type"] == "sql") == 10
    keyed = [
        e["data"]["key"] for e in history if isinstance(e["data"], dict) and "key" in e["data"]
    ]
    assert len(keyed) == len(set(keyed))  # each idempotency key published once
    expected_news = [e["id"] for e in history]
    assert news.wait_ids(len(expected_news), timeout=15) == expected_news
    expected_mine = sorted(expected_news + [e["id"] for e in personal])
    assert mine.wait_ids(len(expected_mine), timeout=15) == expected_mine
    for s in (mine, news):
        s.close()
    for srv in (a, b):
        assert httpx.get(f"{srv.url}/readyz").status_code == 200


def _all(base: str, path: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        r = httpx.get(f"{base}{path}", params={"after": after, "limit": 1000}, headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()["events"]
        if not page:
            return events
        events += page
        after = page[-1]["id"]
