"""The database functions are their source files, and SQL and Python keep one set of rules.

(a) After the migrations, every ssehub function in the database is, byte for
byte, its file in ``app/events/sql`` (as ``pg_get_functiondef`` prints it),
and there is no function without a file or file without a function.

(b) Where ``ssehub_enqueue`` and the HTTP endpoints check the same thing (an
event type, an idempotency key, a size in bytes of compact JSON, the lengths
the tables take, the publish lock), both sides are asked, each through its own
code, over every character or every length that could tell them apart.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest
from pydantic import ValidationError

from app.auth.personal import personal_channel
from app.auth.schemas import RegisterIn
from app.channels.schemas import ChannelIn
from app.config import Settings
from app.db import asyncpg_dsn
from app.errors import SsehubError
from app.events import functions
from app.events.publisher import PUBLISH_LOCK
from app.events.routes import MAX_IDEMPOTENCY_KEY, _idempotency_key
from app.events.schemas import EventIn
from tests.support import sql

SURROGATES = range(0xD800, 0xE000)
# Characters Postgres's text can hold (no NUL, no surrogates): the whole Basic
# Multilingual Plane, where every whitespace and every special character is,
# and a sample of the planes above it.
CODE_POINTS = [
    cp for cp in range(1, 0x110000) if cp not in SURROGATES and (cp < 0x10000 or cp % 251 == 0)
]
_SQL_CODE_POINTS = (
    "SELECT array_agg(cp ORDER BY cp) FROM unnest($1::integer[]) AS cp WHERE {predicate}"
)


def _functions(database_url: str) -> list[asyncpg.Record]:
    return asyncio.run(
        sql(
            database_url,
            "SELECT p.proname, pg_get_functiondef(p.oid) AS definition, p.prosecdef, "
            "p.proconfig, p.proacl IS NOT NULL AND NOT EXISTS ("
            "    SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0) AS not_public "
            "FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace "
            "AND p.proname LIKE 'ssehub\\_%' ORDER BY p.proname",
        )
    )


def test_the_database_runs_exactly_the_functions_in_app_events_sql(database_url: str) -> None:
    rows = _functions(database_url)
    sources = functions.sources()
    assert [row["proname"] for row in rows] == sorted(sources)
    for row in rows:
        assert row["definition"] == sources[row["proname"]], row["proname"]
        assert "search_path=pg_catalog, pg_temp" in (row["proconfig"] or []), row["proname"]
        assert row["prosecdef"] == (row["proname"] == "ssehub_enqueue"), row["proname"]
        assert row["not_public"], f"PUBLIC may execute {row['proname']}"


def _python_accepts(check: Callable[[str], object], value: str) -> bool:
    try:
        check(value)
    except (ValidationError, SsehubError, ValueError):
        return False
    return True


def _event_type(value: str) -> object:
    return EventIn.model_validate({"type": value, "data": 1})


async def _sql_accepts(database_url: str, function: str, values: list[str]) -> list[bool]:
    rows = await sql(
        database_url,
        f"SELECT {function}(v) FROM unnest($1::text[]) WITH ORDINALITY AS u(v, n) ORDER BY n",
        values,
    )
    return [bool(row[0]) for row in rows]


async def _sql_code_points(database_url: str, predicate: str) -> list[int]:
    rows = await sql(database_url, _SQL_CODE_POINTS.format(predicate=predicate), CODE_POINTS)
    return list(rows[0][0] or [])


# Strings where a rule's edges are: lengths, the reserved prefix, whitespace around text.
EDGES = [
    "a" * 64,
    "a" * 65,
    "k" * 200,
    "k" * 201,
    "ssehub.",
    "ssehub.x",
    "Ssehub.x",
    "ssehub",
    "xssehub.y",
    "a\n",
    "\na",
    "a b",
    " a ",
    "\t\n \u3000\u2028",
    "\u00a0x\u00a0",
]


@pytest.mark.parametrize(
    ("function", "check"),
    [
        ("ssehub_event_type_valid", _event_type),
        ("ssehub_idempotency_key_valid", _idempotency_key),
    ],
)
def test_sql_and_http_accept_the_same_types_and_keys(
    database_url: str, function: str, check: Callable[[str], object]
) -> None:
    """Over every single character, and the strings at the rules' edges."""
    sql_accepts = asyncio.run(_sql_code_points(database_url, f"{function}(chr(cp))"))
    python_accepts = [cp for cp in CODE_POINTS if _python_accepts(check, chr(cp))]
    assert sql_accepts == python_accepts
    edges = asyncio.run(_sql_accepts(database_url, function, EDGES))
    assert edges == [_python_accepts(check, value) for value in EDGES]


# Documents whose compact JSON both sides must write alike (jsonb orders an
# object's keys its own way, so objects are compared by size and value).
DOCUMENTS: list[Any] = [
    [1, 2.5, -3, 0, True, False, None, "a, b: c", [], {}, [[[]]]],
    'a "quoted" line\nwith spaces, commas: colons; é ü 日本 \\ \t \u2028 \U0001f600',
    {"b": [1, {"c": None, "d": [True, False]}], "a": {}, "e": [], "text": "x, y: z"},
    {"": "", " ": " ", '"': "\\", "nested": {"deeper": {"deepest": [1, "two", 3.0]}}},
    12345678901234567890,
    -0.000125,
]


def test_sql_and_http_count_the_same_bytes_of_compact_json(database_url: str) -> None:
    """The size limit is in bytes of compact JSON: a string holding any one
    character (NUL aside, which jsonb cannot hold), and whole documents."""
    points = CODE_POINTS
    rows = asyncio.run(
        sql(
            database_url,
            "SELECT octet_length(ssehub_compact_json(to_jsonb(chr(cp)))) "
            "FROM unnest($1::integer[]) WITH ORDINALITY AS u(cp, n) ORDER BY n",
            points,
        )
    )
    sizes = {cp: row[0] for cp, row in zip(points, rows, strict=True)}
    differ = {
        cp: (n, len(orjson.dumps(chr(cp))))
        for cp, n in sizes.items()
        if n != len(orjson.dumps(chr(cp)))
    }
    assert differ == {}
    texts = [json.dumps(doc) for doc in DOCUMENTS]
    rows = asyncio.run(
        sql(
            database_url,
            "SELECT ssehub_compact_json(d::jsonb) FROM unnest($1::text[]) WITH ORDINALITY AS u(d, n) "
            "ORDER BY n",
            texts,
        )
    )
    for doc, row in zip(DOCUMENTS, rows, strict=True):
        ours = orjson.dumps(orjson.loads(json.dumps(doc)))
        assert len(row[0].encode()) == len(ours), (doc, row[0], ours)
        assert json.loads(row[0]) == json.loads(ours)
        if not isinstance(doc, dict):
            assert row[0].encode() == ours


def test_sql_takes_the_settings_default_limit_with_no_instance_running(database_url: str) -> None:
    async def without_instances() -> int:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with conn.transaction():
                await conn.execute("DELETE FROM ssehub_instance_limits")
                limit: int = await conn.fetchval("SELECT ssehub_max_event_bytes()")
                raise _RollBack(limit)
        except _RollBack as done:
            return done.limit
        finally:
            await conn.close()

    assert asyncio.run(without_instances()) == Settings.model_fields["max_event_bytes"].default


class _RollBack(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit


def _longest(valid: Callable[[str], object], fill: str = "a") -> int:
    """The longest run of ``fill`` that ``valid`` accepts."""
    return max(n for n in range(1, 300) if _python_accepts(valid, fill * n))


def test_the_tables_hold_what_python_accepts(database_url: str) -> None:
    rows = asyncio.run(
        sql(
            database_url,
            "SELECT table_name || '.' || column_name, character_maximum_length "
            "FROM information_schema.columns WHERE table_schema = 'public' "
            "AND character_maximum_length IS NOT NULL",
        )
    )
    lengths = dict(rows)
    event_type = _longest(_event_type)
    channel = max(
        _longest(lambda name: ChannelIn(name=name)),
        len(personal_channel("a" * _longest(lambda u: RegisterIn(username=u, password="p" * 12)))),
    )
    assert lengths["events.type"] == lengths["ssehub_inbox.type"] == event_type
    assert lengths["channels.name"] == channel
    assert lengths["idempotency_keys.key"] == lengths["ssehub_inbox.idempotency_key"]
    assert lengths["idempotency_keys.key"] == MAX_IDEMPOTENCY_KEY == _longest(_idempotency_key, "k")


def test_sql_takes_the_publish_lock_python_names(database_url: str) -> None:
    async def run() -> None:
        holder = await asyncpg.connect(asyncpg_dsn(database_url))
        other = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with holder.transaction():
                await holder.execute("SELECT pg_advisory_xact_lock($1)", PUBLISH_LOCK)
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await other.execute("SELECT ssehub_publish_lock(50)")
            async with other.transaction():
                await other.execute("SELECT ssehub_publish_lock(50)")
                assert not await holder.fetchval(
                    "SELECT pg_try_advisory_xact_lock($1)", PUBLISH_LOCK
                )
                # The bound was the call's own: the caller's lock_timeout is back.
                assert await other.fetchval("SHOW lock_timeout") == "0"
        finally:
            await holder.close()
            await other.close()

    asyncio.run(run())
