"""The database functions as source, safe to run as their owner; chunked moves; batch keys

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-09

- Every function's definition now lives in ``app/events/sql`` (one file each,
  applied by ``app.events.functions.apply``): this migration and every later one
  that changes a function apply the files, so the files are the functions.
- Every function fixes ``search_path`` to ``pg_catalog, pg_temp`` and names
  ssehub's objects with their schema: a role that may create in ``public`` can
  shadow nothing they call (``ssehub_enqueue`` runs as its owner). ``EXECUTE``
  on all of them is taken from ``PUBLIC``.
- ``ssehub_move_inbox`` moves a transaction larger than its row budget in
  chunks, sets aside one whose rows fail (``ssehub_inbox_stalled``), and with
  ``ssehub_publish_as`` waits a bounded time for the publish lock
  (``ssehub_publish_lock``); ``ssehub_inbox`` is indexed by (txid, id) so a
  chunk is found without reading the rest of its transaction.
- ``idempotency_keys`` keeps the types and data of every event a key was first
  used for (a batch's), so a retried batch answers with the whole first batch.
- ``ssehub_config`` (one ``max_event_bytes`` row, written by every instance as
  it started: the last one won) gives way to ``ssehub_instance_limits``: each
  running instance declares its limit, and ``ssehub_enqueue`` takes the
  smallest (``ssehub_max_event_bytes``).

Instances of the previous release call ``ssehub_publish_as`` and
``ssehub_move_inbox`` with their old arguments, which go: all instances must run
this release once it is migrated.
"""

from collections.abc import Sequence
from typing import Any

from alembic import context

from app.events import functions

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _previous() -> Any:
    """0004's module: its functions (restored on the way down) and its ``_sql``."""
    return context.script.get_revision("0004").module


UPGRADE = (
    "ALTER TABLE public.idempotency_keys ADD COLUMN types text[], ADD COLUMN datas text[]",
    "UPDATE public.idempotency_keys SET types = ARRAY[type::text], datas = ARRAY[data]",
    "ALTER TABLE public.idempotency_keys ALTER COLUMN types SET NOT NULL, "
    "ALTER COLUMN datas SET NOT NULL, DROP COLUMN type, DROP COLUMN data",
    "DROP INDEX public.ix_ssehub_inbox_txid",
    "CREATE INDEX ix_ssehub_inbox_txid_id ON public.ssehub_inbox (txid, id)",
    """CREATE TABLE public.ssehub_inbox_stalled (
    txid xid8 PRIMARY KEY,
    failures integer NOT NULL,
    retry_at timestamptz NOT NULL,
    error text NOT NULL
)""",
    """CREATE TABLE public.ssehub_instance_limits (
    instance uuid PRIMARY KEY,
    max_event_bytes integer NOT NULL,
    expires_at timestamptz NOT NULL
)""",
    "DROP TABLE public.ssehub_config",
    "DROP FUNCTION public.ssehub_move_inbox(integer)",
    "DROP FUNCTION public.ssehub_publish_as(bigint[], bigint[], text[], text[], text[], text[])",
    "DROP FUNCTION public.ssehub_append(bigint[], text[], text[], text[])",
)

# This release's functions that 0004 did not have, or had with other arguments.
NEW_FUNCTIONS = (
    "ssehub_move_inbox(integer, integer)",
    "ssehub_publish_as(bigint[], bigint[], text[], text[], text[], text[], integer[], integer)",
    "ssehub_append(bigint[], text[], text[], text[], integer[])",
    "ssehub_publish_lock(integer)",
    "ssehub_event_type_valid(text)",
    "ssehub_idempotency_key_valid(text)",
    "ssehub_max_event_bytes()",
)


def upgrade() -> None:
    sql = _previous()._sql
    for statement in UPGRADE:
        sql(statement)
    functions.apply(sql)


def downgrade() -> None:
    previous = _previous()
    for signature in NEW_FUNCTIONS:
        previous._sql(f"DROP FUNCTION public.{signature}")
    for statement in (
        # Same arguments as 0004's: replaced, so grants on ssehub_enqueue stay.
        *(
            definition.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
            for definition in (previous.COMPACT, previous.ENQUEUE, previous.DELETE_EVENTS)
        ),
        "CREATE TABLE public.ssehub_config (name text PRIMARY KEY, value text NOT NULL)",
        "DROP TABLE public.ssehub_instance_limits",
        "DROP TABLE public.ssehub_inbox_stalled",
        "DROP INDEX public.ix_ssehub_inbox_txid_id",
        "CREATE INDEX ix_ssehub_inbox_txid ON public.ssehub_inbox (txid)",
        "ALTER TABLE public.idempotency_keys ADD COLUMN type varchar(64), ADD COLUMN data text",
        "UPDATE public.idempotency_keys SET type = types[1], data = datas[1]",
        "ALTER TABLE public.idempotency_keys ALTER COLUMN type SET NOT NULL, "
        "ALTER COLUMN data SET NOT NULL, DROP COLUMN types, DROP COLUMN datas",
        previous.APPEND,
        previous.PUBLISH_AS,
        previous.MOVE_INBOX,
    ):
        previous._sql(statement)
