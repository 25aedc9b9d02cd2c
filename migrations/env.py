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
        refuse_a_version_table_of_another_role(connection)
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


# The owner of an existing bookkeeping table, when it is not the role migrating.
_FOREIGN_VERSION_TABLE = """
SELECT pg_catalog.pg_get_userbyid(c.relowner) FROM pg_catalog.pg_class c
WHERE c.oid = pg_catalog.to_regclass('public.alembic_version')
  AND c.relowner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER)
"""


def refuse_a_version_table_of_another_role(connection: Connection) -> None:
    """Exit if ``public.alembic_version`` exists and another role owns it.

    Alembic creates the table only when it is missing and otherwise writes to
    it (and believes what it reads). A role that may create in ``public`` could
    make it before ssehub first migrates, with a trigger of its own, which
    would then run as the migrating role; or with a version row, so that
    ssehub would take tables the same role made for ssehub's. Every other
    object of ssehub's is made by a plain CREATE, which fails if its name is
    taken, so owning this table means owning the schema's history."""
    owner = connection.execute(text(_FOREIGN_VERSION_TABLE)).scalar()
    connection.commit()  # Alembic begins its own transaction, as it would without this
    if owner is not None:
        raise SystemExit(
            f"ssehub: public.alembic_version belongs to role {owner!r}, not to the role "
            "migrating: ssehub's tables must all be its own role's. Migrate as that role "
            "if it is ssehub's, else drop the table (another role made it)"
        )


async def run_migrations_online() -> None:
    engine = create_engine(database_url(), pool_size=1)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
