"""ssehub_publish(): the ordered write, one round trip per batch

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Takes the publish lock, draws ids in request order, inserts (skipping
idempotency-key conflicts) and notifies, all in the single statement's
transaction. See app/events/publisher.py for why the lock makes ids visible
in increasing order.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The function, as a constant: a later migration restores it on its way down.
PUBLISH = """
CREATE FUNCTION public.ssehub_publish(
    p_channel_ids bigint[], p_types text[], p_datas text[], p_keys text[]
) RETURNS TABLE (
    event_id bigint, event_channel_id bigint, event_key text, event_published_at timestamptz
) LANGUAGE plpgsql AS $$
BEGIN
    -- First the lock: no id is drawn by anyone else until this transaction commits.
    PERFORM pg_advisory_xact_lock(351819);  -- 0x55E4B, app.events.publisher.PUBLISH_LOCK
    RETURN QUERY
    WITH drawn AS (
        SELECT array_agg(x ORDER BY x) AS ids
        FROM (SELECT nextval(pg_get_serial_sequence('events', 'id')) AS x
              FROM generate_series(1, cardinality(p_channel_ids))) d
    ), inserted AS (
        INSERT INTO events AS e (id, channel_id, type, data, idempotency_key)
        SELECT drawn.ids[u.n], u.c, u.t, u.d, u.k
        FROM unnest(p_channel_ids, p_types, p_datas, p_keys) WITH ORDINALITY AS u(c, t, d, k, n),
             drawn
        ON CONFLICT (channel_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING e.id, e.channel_id, e.idempotency_key::text, e.published_at
    ), notified AS (
        SELECT pg_notify('ssehub_events', max(inserted.id)::text) AS sent
        FROM inserted HAVING count(*) > 0
    )
    SELECT inserted.* FROM inserted LEFT JOIN notified ON true;
END
$$
"""


def upgrade() -> None:
    op.execute(PUBLISH)


def downgrade() -> None:
    op.execute("DROP FUNCTION public.ssehub_publish(bigint[], text[], text[], text[])")
