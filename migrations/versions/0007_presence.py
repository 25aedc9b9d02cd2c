"""Presence: the channel flag, each instance's heartbeat, and its leases

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

- ``channels.presence`` turns presence on for a channel (``app.realtime.presence``).
- ``presence_instances``: one row per running instance, renewed by its
  heartbeat; an instance whose heartbeat is older than the TTL is dead, and any
  other deletes it with its leases.
- ``presence_leases``: per channel, user and instance, how many of the user's
  streams on that instance carry the channel and since when.
- ``presence_versions``: per channel, a number every change of its leases
  raises, so an instance re-reads a channel's list only when it changed.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = (
    "ALTER TABLE public.channels ADD COLUMN presence boolean NOT NULL DEFAULT false",
    """CREATE TABLE public.presence_instances (
    id uuid PRIMARY KEY,
    heartbeat_at timestamptz NOT NULL
)""",
    """CREATE TABLE public.presence_leases (
    channel_id bigint NOT NULL REFERENCES public.channels (id) ON DELETE CASCADE,
    user_id bigint NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    instance_id uuid NOT NULL REFERENCES public.presence_instances (id) ON DELETE CASCADE,
    streams integer NOT NULL,
    since timestamptz NOT NULL,
    PRIMARY KEY (channel_id, user_id, instance_id)
)""",
    "CREATE INDEX ix_presence_leases_instance_id ON public.presence_leases (instance_id)",
    "CREATE INDEX ix_presence_leases_user_id ON public.presence_leases (user_id)",
    """CREATE TABLE public.presence_versions (
    channel_id bigint PRIMARY KEY REFERENCES public.channels (id) ON DELETE CASCADE,
    version bigint NOT NULL
)""",
)

DOWNGRADE = (
    "DROP TABLE public.presence_versions",
    "DROP TABLE public.presence_leases",
    "DROP TABLE public.presence_instances",
    "ALTER TABLE public.channels DROP COLUMN presence",
)


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
