"""The inbox is never truncated by a vacuum

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

A vacuum that finds empty pages at the end of ``ssehub_inbox`` cuts them off,
which needs an ACCESS EXCLUSIVE lock on the table. The inbox is a queue: rows
are appended at its end and deleted from its start all the time, so its tail
keeps emptying and filling. Cutting it off makes every enqueueing transaction
wait for the lock, and a vacuum that cannot get it while enqueues go on keeps
trying for up to 5 s. With ``vacuum_truncate`` off, vacuum (autovacuum and the
movers' own) only marks the dead rows' space free, which the next enqueues
reuse.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE public.ssehub_inbox SET (vacuum_truncate = false)")


def downgrade() -> None:
    op.execute("ALTER TABLE public.ssehub_inbox RESET (vacuum_truncate)")
