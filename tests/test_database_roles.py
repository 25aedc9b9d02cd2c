"""The database's other roles: what a role granted ``ssehub_enqueue`` can and cannot do,
and ssehub run by an ordinary (non-superuser) owner role.

Real roles on the test Postgres (which trusts local logins), a real ``ssehub
serve``, ``ssehub migrate`` and ``ssehub grant-publisher`` run as an operator runs
them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx

from app.db import asyncpg_dsn
from tests.support import (
    ADMIN_PASSWORD,
    Api,
    Server,
    as_role,
    auth,
    run_cli,
    sql,
    with_database,
)

ENQUEUE = "SELECT ssehub_enqueue($1, $2, $3::jsonb, $4)"


@asynccontextmanager
async def role(database_url: str, prefix: str, *options: str) -> AsyncIterator[str]:
    """A new login role, dropped with everything it owns afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    await sql(database_url, f"CREATE ROLE {name} LOGIN {' '.join(options)}")
    try:
        yield name
    finally:
        await sql(database_url, f"DROP OWNED BY {name} CASCADE")
        await sql(database_url, f"DROP ROLE {name}")


async def connect_as(database_url: str, name: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(asyncpg_dsn(as_role(database_url, name)))
    assert await conn.fetchval("SELECT current_user") == name
    return conn


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("not reached in time")
        await asyncio.sleep(0.05)


def history(base: str, admin: dict[str, str], channel: str) -> list[Any]:
    r = httpx.get(f"{base}/channels/{channel}/events", headers=admin, timeout=10)
    assert r.status_code == 200, r.text
    return [e["data"] for e in r.json()["events"]]


# What the attacker's code does wherever it runs: note who ran it and in which
# statement, then try to become superuser and to make a user of ssehub an admin.
# Every shadow below calls it, then answers what the built-in it shadows would.
SPY = """
CREATE FUNCTION public.{r}_spy() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.{r}_ran (who, statement) VALUES (current_user, current_query());
    BEGIN
        EXECUTE 'ALTER ROLE {r} SUPERUSER';
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        UPDATE public.users SET is_admin = true
        WHERE username::text OPERATOR(pg_catalog.=) 'mallory'::text;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
END
$$
"""
SHADOWS = (
    # An exact match for varchar = text beats pg_catalog's text = text.
    """CREATE FUNCTION public.{r}_eq(a varchar, b text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.{r}_spy(); RETURN a::text OPERATOR(pg_catalog.=) b; END $$""",
    "CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = text, FUNCTION = public.{r}_eq)",
    # Exact matches beat pg_catalog's polymorphic to_json(anyelement) and cardinality(anyarray).
    """CREATE FUNCTION public.to_json(t text) RETURNS json LANGUAGE plpgsql AS $$
BEGIN PERFORM public.{r}_spy(); RETURN pg_catalog.to_json(t); END $$""",
    """CREATE FUNCTION public.cardinality(a bigint[]) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN PERFORM public.{r}_spy(); RETURN pg_catalog.cardinality(a); END $$""",
    # Overloads of the writer's own calls: text wins for arguments of unknown type.
    """CREATE FUNCTION public.ssehub_move_inbox(a text) RETURNS SETOF record LANGUAGE plpgsql AS $$
BEGIN PERFORM public.{r}_spy(); END $$""",
    """CREATE FUNCTION public.ssehub_move_inbox(a text, b text) RETURNS SETOF record
LANGUAGE plpgsql AS $$ BEGIN PERFORM public.{r}_spy(); END $$""",
)


async def test_attack_operator_shadowing_in_public_runs_nothing_as_the_owner(
    server: Server, database_url: str
) -> None:
    """A role that ``grant-publisher`` prepared and that may create in ``public``
    shadows ``=``, two built-ins and the writer's call there, then enqueues.
    Neither ``ssehub_enqueue`` (run as its owner, here a superuser) nor the
    writer moving it and publishing (as the server's role) may run any of it.

    The server's rights check answers this admin and channel from memory once
    warmed up, so what runs in the database after the shadows exist is
    ssehub's functions and the writer's calls of them."""
    api = Api(server.url)
    admin = api.admin()
    assert api.http.post("/channels", json={"name": "news"}, headers=admin).status_code == 201
    mallory = api.user("mallory")
    warm = api.http.post("/channels/news/events", json={"data": {"u": "warm"}}, headers=admin)
    assert warm.status_code == 201, warm.text
    channel_id = (await sql(database_url, "SELECT id FROM channels WHERE name = 'news'"))[0][0]
    async with role(database_url, "ssehub_attacker") as attacker:
        done = run_cli("grant-publisher", attacker, database_url=database_url)
        assert done.returncode == 0, done.stderr
        await sql(database_url, f"GRANT CREATE ON SCHEMA public TO {attacker}")
        conn = await connect_as(database_url, attacker)
        try:
            await conn.execute(f"CREATE TABLE public.{attacker}_ran (who text, statement text)")
            await conn.execute(f"GRANT INSERT ON public.{attacker}_ran TO PUBLIC")
            for statement in (SPY, *SHADOWS):
                await conn.execute(statement.format(r=attacker))
            async with conn.transaction():
                await conn.execute(ENQUEUE, "news", "message", json.dumps({"u": "enqueued"}), None)
                await conn.execute(ENQUEUE, "news", "message", json.dumps({"u": "keyed"}), "k-1")
        finally:
            await conn.close()

        async def stored() -> list[str]:
            rows = await sql(
                database_url,
                "SELECT data FROM events WHERE channel_id = $1 ORDER BY id",
                channel_id,
            )
            return [json.loads(row[0])["u"] for row in rows]

        async def moved() -> bool:
            return len(await stored()) == 3

        await eventually(moved)
        r = api.http.post("/channels/news/events", json={"data": {"u": "api"}}, headers=admin)
        assert r.status_code == 201, r.text
        batch = {"events": [{"data": {"u": "b1"}}, {"data": {"u": "b2"}}]}
        r = api.http.post("/channels/news/events/batch", json=batch, headers=admin)
        assert r.status_code == 201, r.text
        assert await stored() == ["warm", "enqueued", "keyed", "api", "b1", "b2"]

        ran = await sql(database_url, f"SELECT who, statement FROM public.{attacker}_ran")
        superuser = await sql(
            database_url, "SELECT rolsuper FROM pg_roles WHERE rolname = $1", attacker
        )
        admins = await sql(database_url, "SELECT username FROM users WHERE is_admin ORDER BY 1")
        assert [tuple(row) for row in ran if row[0] != attacker] == [], "ran as another role"
        assert superuser[0][0] is False, "the attacker became superuser"
        assert [row[0] for row in admins] == ["admin"], "a user was made admin"
    assert api.http.get("/users/me", headers=mallory).json()["is_admin"] is False


async def test_migrate_and_serve_as_an_ordinary_database_owner(postgres_server_url: str) -> None:
    """An owner role with nothing but CREATEDB creates its database, migrates it,
    grants a publisher and serves: no superuser anywhere. The granted role may
    execute ``ssehub_enqueue`` and no other function of ssehub's."""
    async with (
        role(postgres_server_url, "ssehub_owner", "CREATEDB") as owner,
        role(postgres_server_url, "ssehub_app") as app_role,
    ):
        name = f"{owner}_db"
        owner_conn = await connect_as(postgres_server_url, owner)
        try:
            await owner_conn.execute(f"CREATE DATABASE {name}")
        finally:
            await owner_conn.close()
        url = as_role(with_database(postgres_server_url, name), owner)
        try:
            await _migrate_grant_and_serve(url, owner, app_role)
        finally:
            await sql(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _migrate_grant_and_serve(url: str, owner: str, app_role: str) -> None:
    done = await asyncio.to_thread(run_cli, "migrate", database_url=url)
    assert done.returncode == 0, done.stderr
    owners = await sql(
        url,
        "SELECT DISTINCT pg_get_userbyid(p.proowner) FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public' AND p.proname LIKE 'ssehub%'",
    )
    assert [row[0] for row in owners] == [owner]
    done = await asyncio.to_thread(run_cli, "grant-publisher", app_role, database_url=url)
    assert done.returncode == 0, done.stderr
    executable = await sql(
        url,
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public' AND p.proname LIKE 'ssehub%' "
        "AND has_function_privilege($1, p.oid, 'EXECUTE') ORDER BY 1",
        app_role,
    )
    assert [row[0] for row in executable] == ["ssehub_enqueue"]

    server = Server(
        url, env={"SSEHUB_ADMIN_USERNAME": "admin", "SSEHUB_ADMIN_PASSWORD": ADMIN_PASSWORD}
    ).start()
    try:
        api = Api(server.url)
        admin = api.admin()
        assert api.http.post("/channels", json={"name": "orders"}, headers=admin).status_code == 201
        app = await connect_as(url, app_role)
        try:
            async with app.transaction():
                await app.execute(ENQUEUE, "orders", "order.paid", json.dumps({"id": 1}), None)
        finally:
            await app.close()

        async def moved() -> bool:
            return history(server.url, admin, "orders") == [{"id": 1}]

        await eventually(moved)
        r = api.http.post("/channels/orders/events", json={"data": {"id": 2}}, headers=admin)
        assert r.status_code == 201, r.text
        assert history(server.url, admin, "orders") == [{"id": 1}, {"id": 2}]
        token = api.login("admin", ADMIN_PASSWORD)
        assert api.http.get("/users/me", headers=auth(token)).status_code == 200
    finally:
        server.stop()
