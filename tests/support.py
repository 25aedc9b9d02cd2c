"""Test plumbing shared by every suite: databases, real server processes, API helpers.

Everything here talks to real parts: a real Postgres (``SSEHUB_TEST_DATABASE_URL``
or the embedded one), and ``ssehub serve`` running as a subprocess on a free
port, reached over a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx

from app.auth.personal import insert_personal_channels
from app.db import asyncpg_dsn

ROOT = Path(__file__).resolve().parent.parent
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
TEST_SECRET = "test-secret-key-that-is-long-enough-for-hs256-0123456789"
ADMIN_PASSWORD = "admin-password-1"
# Channels first: a publish locks its channel's row, then writes events, so a
# TRUNCATE that took events first could deadlock with a publish still running.
TABLES = (
    "channels",
    "idempotency_keys",
    "events",
    "subscriptions",
    "channel_members",
    "users",
    "api_keys",
    "external_tombstones",
    "ssehub_inbox",
    "ssehub_inbox_stalled",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def postgres_address(url: str) -> tuple[str, int]:
    """Where the Postgres of a database URL listens: a host name, or the directory
    of its Unix socket (the embedded Postgres listens only there), and the port."""
    parts = urlsplit(asyncpg_dsn(url))
    host = parts.hostname or parse_qs(parts.query).get("host", [""])[0]
    if not host:
        raise ValueError(f"no host in {url!r}")
    return host, parts.port or 5432


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead (query string kept)."""
    base, _, query = url.partition("?")
    head = base.rsplit("/", 1)[0]
    return f"{head}/{name}" + (f"?{query}" if query else "")


async def _admin_execute(server_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


def create_database(server_url: str, name: str) -> str:
    asyncio.run(_admin_execute(server_url, f'CREATE DATABASE "{name}"'))
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    asyncio.run(_admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def unique_name(prefix: str = "ssehub_test") -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@contextmanager
def migrated_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new database of its own, migrated to head, with the admin; dropped afterwards."""
    from app.cli import migrate
    from app.config import Settings

    name = unique_name(prefix)
    url = create_database(server_url, name)
    try:
        migrate(Settings(database_url=url))
        make_admin(url)
        yield url
    finally:
        drop_database(server_url, name)


async def sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query against the test database and return its rows."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def beside_a_server(url: str, work: Callable[[asyncpg.Connection], Awaitable[None]]) -> None:
    """``work`` in one transaction on the test database while servers run on it.

    A TRUNCATE locks its tables one by one; a server's transaction that
    touches two of them in the other order (retention, a publish, a
    subscription) deadlocks with it, and Postgres fails one side. When that
    side is ours, the transaction rolled back whole: run it again."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for attempt in range(5):
            try:
                async with conn.transaction():
                    await work(conn)
                return
            except asyncpg.DeadlockDetectedError:
                if attempt == 4:
                    raise
    finally:
        await conn.close()


def truncate_all(url: str) -> None:
    """Empty every table. Identities are *not* restarted: event ids keep growing,
    as they do in production, so a running server's cursors stay meaningful."""

    async def truncate(conn: asyncpg.Connection) -> None:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")

    asyncio.run(beside_a_server(url, truncate))


def make_admin(url: str, username: str = "admin", password: str = ADMIN_PASSWORD) -> None:
    from app.auth.service import ensure_admin
    from app.db import create_engine, create_sessionmaker

    async def run() -> None:
        engine = create_engine(url, pool_size=1)
        try:
            async with create_sessionmaker(engine)() as session:
                await ensure_admin(session, username, password)
                await session.commit()
        finally:
            await engine.dispose()

    asyncio.run(run())


@functools.cache
def _admin_hash() -> str:
    """Argon2 is slow on purpose: hash the suite's admin password once, not per test."""
    from app.auth.passwords import hash_password

    return hash_password(ADMIN_PASSWORD)


def reset_database(url: str) -> None:
    """``truncate_all`` and ``make_admin`` in one connection, with the password
    hashed once per run: every test starts this way, so it must be cheap."""

    async def reset(conn: asyncpg.Connection) -> None:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
        user_id = await conn.fetchval(
            "INSERT INTO users (username, password_hash, is_admin) "
            "VALUES ('admin', $1, true) RETURNING id",
            _admin_hash(),
        )
        await conn.execute(insert_personal_channels("public.users WHERE id = $1"), user_id)

    asyncio.run(beside_a_server(url, reset))


@dataclass
class Server:
    """``ssehub serve`` in a subprocess on a free port.

    ``database_url=None`` runs it without ``SSEHUB_DATABASE_URL``: on the
    embedded Postgres under ``SSEHUB_DATA_DIR`` (pass that in ``env``).
    """

    database_url: str | None
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # False: no --port, for a test that gives the port in SSEHUB_PORT instead.
    port_flag: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Server:
        """Launch, then wait until ``/readyz`` answers 200."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> Server:
        """Start the process and return at once, ready or not."""
        env = {
            **os.environ,
            "SSEHUB_SECRET_KEY": TEST_SECRET,
            "SSEHUB_DATA_DIR": str(ROOT / ".ssehub-test" / "data"),
            # The suite logs in wrongly from one address far more than an attacker
            # is allowed to; the limit itself is tested with its default.
            "SSEHUB_LOGIN_ATTEMPTS_PER_MINUTE": "1000000",
            **self.env,
        }
        if self.database_url is None:
            env.pop("SSEHUB_DATABASE_URL", None)
            env.pop("SSEHUB_SECRET_KEY", None)
        else:
            env["SSEHUB_DATABASE_URL"] = self.database_url
        self.log_path = ROOT / ".ssehub-test" / f"server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "app.cli", "serve", "--workers", str(self.workers)]
        cmd += ["--port", str(self.port)] if self.port_flag else []
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
        return self

    def wait_ready(self, timeout: float = 30) -> Server:
        """Wait until ``/readyz`` answers 200; stop the process if it never does."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 10) -> float:
        """SIGTERM, wait for exit; returns how long the exit took."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - started


class NatsServer:
    """``nats-server`` on its own ports, which ``stop`` then ``start`` keep."""

    def __init__(self, *args: str) -> None:
        """``args`` are passed on as they are: ``--user``/``--pass``, ``--auth``,
        ``--tls`` with its certificate, or ``-c`` with a configuration file."""
        self.port, self.monitor_port = free_port(), free_port()
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = ROOT / ".ssehub-test" / f"nats-{self.port}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([*cmd, *self.args], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
            ):
                if s.recv(4096).startswith(b"INFO"):
                    return self
            time.sleep(0.02)
        raise RuntimeError(f"nats-server not up:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def subscriptions(self) -> list[list[str]]:
        """Each client connection's subjects (the monitoring endpoint's ``connz``)."""
        r = httpx.get(f"http://127.0.0.1:{self.monitor_port}/connz", params={"subs": 1})
        return [c.get("subscriptions_list", []) for c in r.json()["connections"]]


class Api:
    """A thin httpx client with the calls every test needs."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=30)

    def register(self, username: str, password: str = "password-123") -> httpx.Response:
        return self.http.post("/auth/register", json={"username": username, "password": password})

    def login(self, username: str, password: str = "password-123") -> str:
        r = self.http.post("/auth/token", data={"username": username, "password": password})
        assert r.status_code == 200, r.text
        token: str = r.json()["access_token"]
        return token

    def user(self, username: str, password: str = "password-123") -> dict[str, str]:
        """Register ``username`` and return its auth headers."""
        r = self.register(username, password)
        assert r.status_code == 201, r.text
        return auth(self.login(username, password))

    def admin(self) -> dict[str, str]:
        return auth(self.login("admin", ADMIN_PASSWORD))


def read_history(base: str, headers: dict[str, str], channel: str) -> list[dict[str, Any]]:
    """Every retained event of ``channel``, following ``next_after`` to the end."""
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        r = httpx.get(
            f"{base}/channels/{channel}/events",
            params={"after": after, "limit": 1000},
            headers=headers,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        page = r.json()
        events += page["events"]
        if page["next_after"] is None:
            return events
        after = page["next_after"]


def run_cli(*args: str, database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``ssehub ARGS`` in a subprocess against ``database_url``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={
            **os.environ,
            "SSEHUB_SECRET_KEY": TEST_SECRET,
            "SSEHUB_DATABASE_URL": database_url,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def as_role(database_url: str, role: str) -> str:
    """``database_url`` logged in as ``role`` (the test Postgres trusts local logins)."""
    scheme, rest = database_url.split("://", 1)
    return f"{scheme}://{role}@{rest.split('@', 1)[1]}"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def counter_by_label(base: str, name: str, label: str) -> defaultdict[str, float]:
    """A counter of one instance's ``/metrics`` with one label, by the label's
    value (0 for a value it does not show)."""
    counts: defaultdict[str, float] = defaultdict(float)
    for value, count in re.findall(
        rf'^{name}\{{{label}="(\w+)"\}} (\S+)$',
        httpx.get(f"{base}/metrics", timeout=10).text,
        re.MULTILINE,
    ):
        counts[value] = float(count)
    return counts


def metric_value(base: str, name: str) -> float:
    """An unlabelled sample of one instance's ``/metrics`` (0 if it shows none)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def broker_events(base: str) -> dict[str, float]:
    """``ssehub_broker_events_total`` of one instance, by source (``app.metrics``)."""
    return counter_by_label(base, "ssehub_broker_events_total", "source")
