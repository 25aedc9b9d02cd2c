"""Migrations: up from empty, down to empty, and safe when instances start together."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from alembic import command

from app.cli import alembic_config, migrate
from app.config import Settings
from app.models import Base
from tests.support import ROOT, TEST_SECRET, create_database, drop_database, sql, unique_name

TABLES = {
    "users",
    "channels",
    "channel_members",
    "subscriptions",
    "events",
    "idempotency_keys",
    "signing_keys",
    "api_keys",
    "external_tombstones",
    "ssehub_inbox",
    "ssehub_inbox_stalled",
    "ssehub_instance_limits",
    "presence_instances",
    "presence_leases",
    "presence_versions",
}


@pytest.fixture
def empty_database(postgres_server_url: str) -> Iterator[str]:
    name = unique_name("ssehub_migrations")
    url = create_database(postgres_server_url, name)
    yield url
    drop_database(postgres_server_url, name)


def _tables(url: str) -> set[str]:
    rows = asyncio.run(sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    return {r[0] for r in rows}


def test_upgrade_from_empty_then_downgrade_to_empty(empty_database: str) -> None:
    assert _tables(empty_database) == set()
    migrate(Settings(database_url=empty_database))
    assert _tables(empty_database) == TABLES | {"alembic_version"}
    rows = asyncio.run(sql(empty_database, "SELECT indexname FROM pg_indexes"))
    indexes = {r[0] for r in rows}
    # Every index the models declare exists: the migration and the models agree.
    declared = {ix.name for table in Base.metadata.tables.values() for ix in table.indexes}
    assert declared <= indexes, declared - indexes
    assert {"ix_events_channel_id_id", "idempotency_keys_pkey"} <= indexes
    # The inbox is a queue: no vacuum may take the lock that cuts off its tail.
    options = asyncio.run(
        sql(empty_database, "SELECT reloptions FROM pg_class WHERE oid = 'ssehub_inbox'::regclass")
    )
    assert options[0][0] == ["vacuum_truncate=false"]
    command.downgrade(alembic_config(empty_database), "base")
    # Only Alembic's own bookkeeping table is left, and it records no version.
    assert _tables(empty_database) == {"alembic_version"}
    assert asyncio.run(sql(empty_database, "SELECT * FROM alembic_version")) == []
    rows = asyncio.run(
        sql(
            empty_database,
            "SELECT typname FROM pg_type t JOIN pg_namespace n "
            "ON n.oid = t.typnamespace WHERE nspname = 'public' "
            "AND typtype IN ('e', 'c') AND typname <> 'alembic_version'",
        )
    )
    assert rows == []
    # Functions, triggers and sequences a later migration adds must go on the way down too.
    leftovers = asyncio.run(
        sql(
            empty_database,
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'public' UNION ALL "
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'S'",
        )
    )
    assert leftovers == []
    migrate(Settings(database_url=empty_database))  # and up again
    assert _tables(empty_database) >= TABLES


def test_concurrent_migrations_on_one_database_both_succeed(empty_database: str) -> None:
    env = {**os.environ, "SSEHUB_DATABASE_URL": empty_database, "SSEHUB_SECRET_KEY": TEST_SECRET}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "migrate"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert _tables(empty_database) >= TABLES
