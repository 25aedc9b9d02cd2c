"""The database's other roles: what a role granted ``ssehub_enqueue`` can and cannot do,
what one that may create in ``public`` can make ssehub's own sessions and migrations
run (nothing), and ssehub run by an ordinary (non-superuser) owner role.

Real roles on the test Postgres (which trusts local logins), a real ``ssehub
serve``, ``ssehub migrate`` and ``ssehub grant-publisher`` run as an operator runs
them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from alembic import command

from app.cli import alembic_config
from tests.support import (
    ADMIN_PASSWORD,
    Api,
    Server,
    as_role,
    auth,
    create_database,
    drop_database,
    eventually,
    read_history,
    run_cli,
    sql,
    unique_name,
    with_database,
)
from tests.support.roles import (
    SESSION_SHADOWS,
    SHADOWS,
    SPY,
    assert_nothing_ran_as_another_role,
    attacker,
    connect_as,
    role,
)
from tests.support.sse import SseStream

ENQUEUE = "SELECT ssehub_enqueue($1, $2, $3::jsonb, $4)"


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
    async with attacker(database_url, SHADOWS) as name:
        conn = await connect_as(database_url, name)
        try:
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

        await eventually(moved, "the enqueued event stored")
        r = api.http.post("/channels/news/events", json={"data": {"u": "api"}}, headers=admin)
        assert r.status_code == 201, r.text
        batch = {"events": [{"data": {"u": "b1"}}, {"data": {"u": "b2"}}]}
        r = api.http.post("/channels/news/events/batch", json=batch, headers=admin)
        assert r.status_code == 201, r.text
        assert await stored() == ["warm", "enqueued", "keyed", "api", "b1", "b2"]
        await assert_nothing_ran_as_another_role(database_url, name)
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
            return [e["data"] for e in read_history(server.url, admin, "orders")] == [{"id": 1}]

        await eventually(moved, "the enqueued event stored")
        r = api.http.post("/channels/orders/events", json={"data": {"id": 2}}, headers=admin)
        assert r.status_code == 201, r.text
        assert [e["data"] for e in read_history(server.url, admin, "orders")] == [
            {"id": 1},
            {"id": 2},
        ]
        token = api.login("admin", ADMIN_PASSWORD)
        assert api.http.get("/users/me", headers=auth(token)).status_code == 200
    finally:
        server.stop()


async def test_attack_shadowing_in_public_runs_nothing_in_ssehubs_own_sessions(
    database_url: str, start_server: Callable[..., Server]
) -> None:
    """The same attacker shadows ``=``, ``||`` and ``unnest`` for the types
    ssehub's own queries use, then a server that has cached nothing is used
    the way its clients use it (log in, register, channels, members,
    subscriptions, publish, history, streams, API keys, enqueue, retention,
    users), and the CLI as an operator runs it. None of it may run the
    attacker's code: every session of ssehub's searches only ``pg_catalog``."""
    async with attacker(database_url, SHADOWS + SESSION_SHADOWS) as name:
        srv = start_server(SSEHUB_RETENTION_INTERVAL_SECONDS="0.2")
        api = Api(srv.url)
        admin = api.admin()
        bob = api.user("bob")
        mallory = api.user("mallory")
        for fields in ({"name": "news", "max_events": 3}, {"name": "secret", "private": True}):
            r = api.http.post("/channels", json=fields, headers=admin)
            assert r.status_code == 201, r.text
        assert api.http.put("/channels/secret/members/bob", headers=admin).status_code == 204
        assert api.http.get("/channels/secret/members", headers=admin).status_code == 200
        assert api.http.put("/me/subscriptions/news", headers=bob).status_code == 201
        assert api.http.put("/me/subscriptions/secret", headers=bob).status_code == 201
        for path in ("/me/subscriptions", "/channels", "/channels/news", "/users/me"):
            assert api.http.get(path, headers=bob).status_code == 200, path
        token = api.http.post("/auth/stream-token", headers=bob).json()["stream_token"]
        stream = SseStream(f"{srv.url}/stream?access_token={token}")
        news = SseStream(f"{srv.url}/channels/news/stream?access_token={token}")
        try:
            for s in (stream, news):
                s.wait_for(lambda st: bool(st.notices("ssehub.live")))
            await _publish_everywhere(api, admin, database_url, name)
            assert len(stream.wait_ids(9, timeout=15)) == 9
        finally:
            stream.close()
            news.close()

        def trimmed() -> bool:  # retention keeps news's last 3
            r = api.http.get("/channels/news/events", headers=admin)
            return len(r.json()["events"]) == 3

        await eventually(lambda: asyncio.to_thread(trimmed), "the history trimmed to 3")
        for path in ("/me/events", "/channels/secret/events"):
            assert api.http.get(path, headers=bob).status_code == 200, path
        assert api.http.get("/users", headers=admin).status_code == 200
        r = api.http.patch("/users/bob", json={"is_admin": True}, headers=admin)
        assert r.status_code == 200, r.text
        assert api.http.delete("/channels/secret/members/bob", headers=admin).status_code == 204
        assert api.http.delete("/users/bob", headers=admin).status_code == 204
        for args in (("create-admin", "boss"), ("api-key", "create", "cli", "--publish", "news")):
            done = await asyncio.to_thread(
                run_cli, *args, database_url=database_url, SSEHUB_ADMIN_PASSWORD=ADMIN_PASSWORD
            )
            assert done.returncode == 0, done.stderr
        assert api.http.get("/users/me", headers=mallory).json()["is_admin"] is False
        srv.stop()  # and what it runs as it stops
        await assert_nothing_ran_as_another_role(database_url, name)


async def _publish_everywhere(
    api: Api, admin: dict[str, str], database_url: str, name: str
) -> None:
    """Nine events bob's stream carries, by every way there is to publish."""
    posts: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/channels/news/events", {"data": 1}, {}),
        ("/channels/news/events", {"data": 2}, {"Idempotency-Key": "k-1"}),
        ("/channels/news/events/batch", {"events": [{"data": 3}, {"data": 4}]}, {}),
        ("/channels/secret/events", {"data": 5}, {}),
        ("/users/bob/events", {"data": 6}, {}),
    ]
    for path, body, extra in posts:
        r = api.http.post(path, json=body, headers={**admin, **extra})
        assert r.status_code == 201, r.text
    r = api.http.post("/api-keys", json={"name": "backend", "publish": ["news"]}, headers=admin)
    assert r.status_code == 201, r.text
    key = auth(r.json()["key"])
    r = api.http.post("/channels/news/events", json={"data": 7}, headers=key)
    assert r.status_code == 201, r.text
    assert api.http.get("/channels/news/events", headers=key).status_code == 200

    def key_used() -> bool:  # written every few seconds, not per request
        listed = api.http.get("/api-keys", headers=admin).json()
        return all(k["last_used_at"] for k in listed)

    await eventually(lambda: asyncio.to_thread(key_used), "every key marked used")
    app = await connect_as(database_url, name)
    try:
        async with app.transaction():
            await app.execute(ENQUEUE, "news", "sql", json.dumps(8), None)
            await app.execute(ENQUEUE, "@bob", "sql", json.dumps(9), "k-2")
    finally:
        await app.close()


async def test_attack_shadowing_in_public_runs_nothing_in_migrations(
    postgres_server_url: str,
) -> None:
    """Migrations run as ssehub's owner too: down one step and up again with
    the attacker's shadows in place (Alembic's own bookkeeping compares
    varchar with varchar) runs none of them."""
    name = unique_name("ssehub_shadowed")
    url = await asyncio.to_thread(create_database, postgres_server_url, name)
    try:
        done = await asyncio.to_thread(run_cli, "migrate", database_url=url)
        assert done.returncode == 0, done.stderr
        async with attacker(url, SHADOWS + SESSION_SHADOWS) as attacker_name:
            await asyncio.to_thread(command.downgrade, alembic_config(url), "-1")
            done = await asyncio.to_thread(run_cli, "migrate", database_url=url)
            assert done.returncode == 0, done.stderr
            await assert_nothing_ran_as_another_role(url, attacker_name)
    finally:
        await asyncio.to_thread(drop_database, postgres_server_url, name)


PLANTED = (
    "CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)",
    "GRANT ALL ON public.alembic_version TO PUBLIC",
    """CREATE FUNCTION public.{r}_planted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM public.{r}_spy(); RETURN NEW; END $$""",
    "CREATE TRIGGER {r}_planted BEFORE INSERT OR UPDATE ON public.alembic_version "
    "FOR EACH ROW EXECUTE FUNCTION public.{r}_planted()",
)


async def test_attack_alembic_version_planted_in_public_before_the_first_migration(
    postgres_server_url: str,
) -> None:
    """A role that may create in ``public`` before ssehub first migrates its
    database plants Alembic's bookkeeping table with a trigger of its own:
    ``ssehub migrate`` refuses a bookkeeping table it does not own, saying
    whose it is, instead of writing to it (which would run the trigger as
    ssehub's owner)."""
    name = unique_name("ssehub_planted")
    url = await asyncio.to_thread(create_database, postgres_server_url, name)
    try:
        async with role(url, "ssehub_attacker") as attacker_name:
            await sql(url, f"GRANT CREATE ON SCHEMA public TO {attacker_name}")
            conn = await connect_as(url, attacker_name)
            try:
                await conn.execute(
                    f"CREATE TABLE public.{attacker_name}_ran (who text, statement text)"
                )
                await conn.execute(f"GRANT INSERT ON public.{attacker_name}_ran TO PUBLIC")
                for statement in (SPY, *PLANTED):
                    await conn.execute(statement.format(r=attacker_name))
            finally:
                await conn.close()
            done = await asyncio.to_thread(run_cli, "migrate", database_url=url)
            ran = await sql(url, f"SELECT who FROM public.{attacker_name}_ran")
            assert [row[0] for row in ran if row[0] != attacker_name] == [], "ran as the owner"
            assert done.returncode != 0
            assert "alembic_version" in done.stderr and attacker_name in done.stderr, done.stderr
            assert "Traceback" not in done.stderr, done.stderr
    finally:
        await asyncio.to_thread(drop_database, postgres_server_url, name)
