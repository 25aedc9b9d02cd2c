"""ssehub_publish_as(): the publish function also checks the caller and the channel

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

A publish used to look the user and the channel up first (several round trips
through the ORM), then call ssehub_publish(). Now the one call does it: for
every row it resolves the publishing user (must exist and be an admin) and the
channel by name, inserts the rows that pass, and reports a status per row.
The checks run inside the same transaction as the insert, so a channel
deleted in between is no longer a separate case. ssehub_publish() stays, so
instances of the previous release keep publishing during a rolling upgrade.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
CREATE FUNCTION ssehub_publish_as(
    p_user_ids bigint[], p_channels text[], p_types text[], p_datas text[], p_keys text[]
) RETURNS TABLE (
    row_number bigint, status text, event_id bigint, event_channel_id bigint,
    event_published_at timestamptz
) LANGUAGE plpgsql AS $$
BEGIN
    -- First the lock: no id is drawn by anyone else until this transaction commits.
    PERFORM pg_advisory_xact_lock(351819);  -- 0x55E4B, app.events.publisher.PUBLISH_LOCK
    RETURN QUERY
    WITH req AS (
        SELECT u.n, u.t, u.d, u.k, usr.is_admin, ch.id AS cid
        FROM unnest(p_user_ids, p_channels, p_types, p_datas, p_keys)
             WITH ORDINALITY AS u(uid, cname, t, d, k, n)
        LEFT JOIN users usr ON usr.id = u.uid
        LEFT JOIN channels ch ON ch.name = u.cname
    ), valid AS (
        SELECT req.*, row_number() OVER (ORDER BY req.n) AS vn
        FROM req WHERE req.is_admin AND req.cid IS NOT NULL
    ), drawn AS (
        SELECT array_agg(x ORDER BY x) AS ids
        FROM (SELECT nextval(pg_get_serial_sequence('events', 'id')) AS x FROM valid) d
    ), inserted AS (
        INSERT INTO events AS e (id, channel_id, type, data, idempotency_key)
        SELECT drawn.ids[v.vn], v.cid, v.t, v.d, v.k FROM valid v, drawn
        ON CONFLICT (channel_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING e.id, e.published_at
    ), notified AS (
        SELECT pg_notify('ssehub_events', max(inserted.id)::text) AS sent
        FROM inserted HAVING count(*) > 0
    )
    SELECT req.n,
           CASE WHEN req.is_admin IS NULL THEN 'unauthorized'
                WHEN NOT req.is_admin THEN 'forbidden'
                WHEN req.cid IS NULL THEN 'not_found'
                WHEN ins.id IS NULL THEN 'duplicate'
                ELSE 'created' END,
           ins.id, req.cid, ins.published_at
    FROM req
    LEFT JOIN valid v ON v.n = req.n
    LEFT JOIN drawn ON true
    LEFT JOIN inserted ins ON ins.id = drawn.ids[v.vn]
    LEFT JOIN notified ON true
    ORDER BY req.n;
END
$$
"""
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION ssehub_publish_as(bigint[], text[], text[], text[], text[])")
