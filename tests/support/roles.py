"""Real database roles for the tests of what other roles can and cannot do: a
throwaway login role, a connection as it, and the attacker that may create in
``public`` and plants shadows of what ssehub's SQL calls (``SHADOWS``,
``SESSION_SHADOWS``), with the check that none of its code ran as anyone else.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from app.db import asyncpg_dsn
from tests.support.db import as_role, sql
from tests.support.servers import run_cli


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


# Exact-type shadows of what ssehub's own queries compare and call (an argument
# of unknown type counts as the other's type), each beating pg_catalog's
# text = text, text || text and unnest(anyarray) wherever `public` is searched.
SESSION_SHADOWS = (
    """CREATE FUNCTION public.{r}_vv(a varchar, b varchar) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM public.{r}_spy(); RETURN a::text OPERATOR(pg_catalog.=) b::text; END $$""",
    "CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.{r}_vv)",
    """CREATE FUNCTION public.{r}_cat(a varchar, b varchar) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM public.{r}_spy(); RETURN a::text OPERATOR(pg_catalog.||) b::text; END $$""",
    "CREATE OPERATOR public.|| (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = public.{r}_cat)",
    """CREATE FUNCTION public.unnest(a bigint[]) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN PERFORM public.{r}_spy(); RETURN QUERY SELECT pg_catalog.unnest(a); END $$""",
)


@asynccontextmanager
async def attacker(database_url: str, shadows: tuple[str, ...]) -> AsyncIterator[str]:
    """A role that ``grant-publisher`` prepared and that may create in ``public``,
    with its spy, its log table (which any role may write to) and ``shadows``."""
    async with role(database_url, "ssehub_attacker") as name:
        done = await asyncio.to_thread(run_cli, "grant-publisher", name, database_url=database_url)
        assert done.returncode == 0, done.stderr
        await sql(database_url, f"GRANT CREATE ON SCHEMA public TO {name}")
        conn = await connect_as(database_url, name)
        try:
            await conn.execute(f"CREATE TABLE public.{name}_ran (who text, statement text)")
            await conn.execute(f"GRANT INSERT ON public.{name}_ran TO PUBLIC")
            for statement in (SPY, *shadows):
                await conn.execute(statement.format(r=name))
        finally:
            await conn.close()
        yield name


async def assert_nothing_ran_as_another_role(database_url: str, name: str) -> None:
    """The spy ran as no one but ``name``, and neither of its attempts succeeded.
    The queries here compare nothing a shadow could take."""
    ran = await sql(database_url, f"SELECT who, statement FROM public.{name}_ran")
    superuser = await sql(database_url, "SELECT rolsuper FROM pg_roles WHERE rolname = $1", name)
    admins = await sql(database_url, "SELECT username FROM public.users WHERE is_admin")
    others = sorted({(row[0], " ".join(row[1].split())[:90]) for row in ran if row[0] != name})
    assert not others, f"ran as another role: {others}"
    assert superuser[0][0] is False, "the attacker became superuser"
    assert "mallory" not in [row[0] for row in admins], "a user was made admin"
