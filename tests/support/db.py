"""Test databases on a real Postgres: made, migrated, emptied, queried.

A run makes its own database (``migrated_database``) on the server of
``SSEHUB_TEST_DATABASE_URL`` or the embedded Postgres, and every test starts from
``reset_database``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from app.auth.personal import insert_personal_channels
from app.db import asyncpg_dsn

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
    "presence_instances",
)


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


def as_role(database_url: str, role: str) -> str:
    """``database_url`` logged in as ``role`` (the test Postgres trusts local logins)."""
    scheme, rest = database_url.split("://", 1)
    return f"{scheme}://{role}@{rest.split('@', 1)[1]}"


class Db:
    """One connection to the test database driven step by step from a sync test,
    so a transaction (or a lock) can stay open across steps."""

    def __init__(self, url: str) -> None:
        self._runner = asyncio.Runner()
        self.conn: Any = self._runner.run(asyncpg.connect(asyncpg_dsn(url)))

    def fetch(self, query: str, *args: Any) -> list[Any]:
        rows: list[Any] = self._runner.run(self.conn.fetch(query, *args))
        return rows

    def execute(self, script: str) -> None:
        self._runner.run(self.conn.execute(script))

    def close(self) -> None:
        self._runner.run(self.conn.close())
        self._runner.close()
