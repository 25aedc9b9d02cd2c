"""signing_keys: a fingerprint of each running instance's signing key

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26

Instances on one database must sign tokens with one key, or each answers the
other's tokens with 401. Every instance records a one-way fingerprint of its
key here and refreshes it while it runs; one that finds a different
fingerprint seen in the last seconds refuses to start
(app/auth/signing_key.py). The fingerprint is an HMAC of a fixed label keyed
with the key: nothing in this table signs a token or helps guess the key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("fingerprint"),
    )


def downgrade() -> None:
    op.drop_table("signing_keys")
