"""Alembic environment: async engine, URL from the Alembic config or SSEHUB_DATABASE_URL."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from app.db import create_engine
from app.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("SSEHUB_DATABASE_URL")
    if not url:
        raise SystemExit("set SSEHUB_DATABASE_URL (or run `ssehub migrate`)")
    return url


# Alembic's bookkeeping table sits beside ssehub's own, named with its schema
# like them: ssehub's sessions do not search ``public`` (app.db.SEARCH_PATH).
VERSION_TABLE_SCHEMA = "public"


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        version_table_schema=VERSION_TABLE_SCHEMA,
    )
    with context.begin_transaction():
        context.run_migrations()


# Several instances may start at once on one database: one migrates at a time.
MIGRATION_LOCK = 0x55E4D


def do_run_migrations(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
    connection.commit()  # the lock is the session's; Alembic runs its own transaction
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table_schema=VERSION_TABLE_SCHEMA,
        )
        with context.begin_transaction():
            context.run_migrations()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
        connection.commit()


async def run_migrations_online() -> None:
    engine = create_engine(database_url(), pool_size=1)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
