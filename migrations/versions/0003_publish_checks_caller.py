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


# The function, as a constant: a later migration restores it on its way down.
PUBLISH_AS = """
CREATE FUNCTION public.ssehub_publish_as(
    p_user_ids bigint[], p_channels text[], p_types text[], p_datas text[], p_keys text[]
) RETURNS TABLE (
    row_number bigint, status text, event_id bigint, event_channel_id bigint,
    event_published_at timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    admins boolean[];  -- per row: the user's is_admin, NULL if there is no such user
    cids bigint[];     -- per row: the channel's id, NULL if there is no such channel
    n_valid bigint;
    first_id bigint;
    at timestamptz;
BEGIN
    -- First the lock: no id is drawn by anyone else until this transaction commits.
    PERFORM pg_advisory_xact_lock(351819);  -- 0x55E4B, app.events.publisher.PUBLISH_LOCK
    SELECT array_agg(usr.is_admin ORDER BY u.n), array_agg(ch.id ORDER BY u.n),
           count(*) FILTER (WHERE usr.is_admin AND ch.id IS NOT NULL)
    INTO admins, cids, n_valid
    FROM unnest(p_user_ids, p_channels) WITH ORDINALITY AS u(uid, cname, n)
    LEFT JOIN users usr ON usr.id = u.uid
    LEFT JOIN channels ch ON ch.name = u.cname;
    -- The rows that pass get first_id, first_id + 1, ... in row order. Only
    -- publishers draw ids, all under the lock above, so one nextval and one
    -- setval reserve the whole range (a nextval per row was a third of the time).
    IF n_valid > 0 THEN
        first_id := nextval(pg_get_serial_sequence('events', 'id'));
        IF n_valid > 1 THEN
            PERFORM setval(pg_get_serial_sequence('events', 'id'), first_id + n_valid - 1);
        END IF;
    END IF;
    -- One publish time for the whole transaction: its events are published together.
    at := clock_timestamp();
    RETURN QUERY
    WITH req AS (
        SELECT u.n, u.t, u.d, u.k, u.adm, u.cid
        FROM unnest(p_types, p_datas, p_keys, admins, cids)
             WITH ORDINALITY AS u(t, d, k, adm, cid, n)
    ), numbered AS (
        SELECT req.n, req.cid, req.t, req.d, req.k,
               first_id + row_number() OVER (ORDER BY req.n) - 1 AS id
        FROM req WHERE req.adm AND req.cid IS NOT NULL
    ), inserted AS (
        INSERT INTO events AS e (id, channel_id, type, data, idempotency_key, published_at)
        SELECT nb.id, nb.cid, nb.t, nb.d, nb.k, at FROM numbered nb
        ON CONFLICT (channel_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING e.id, e.published_at
    ), notified AS (
        SELECT pg_notify('ssehub_events', max(inserted.id)::text) AS sent
        FROM inserted HAVING count(*) > 0
    )
    SELECT req.n,
           CASE WHEN req.adm IS NULL THEN 'unauthorized'
                WHEN NOT req.adm THEN 'forbidden'
                WHEN req.cid IS NULL THEN 'not_found'
                WHEN ins.id IS NULL THEN 'duplicate'
                ELSE 'created' END,
           ins.id, req.cid, ins.published_at
    FROM req
    LEFT JOIN numbered nb ON nb.n = req.n
    LEFT JOIN inserted ins ON ins.id = nb.id
    LEFT JOIN notified ON true
    ORDER BY req.n;
END
$$
"""


def upgrade() -> None:
    op.execute(PUBLISH_AS)


def downgrade() -> None:
    op.execute("DROP FUNCTION public.ssehub_publish_as(bigint[], text[], text[], text[], text[])")
