"""Idempotency keys in a table of their own; rights checked before the publish lock

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Keys lived on the events they named, so retention deleting an event also
forgot its key, and a retry within 24 hours published a second time. Now a key
is a row of ``idempotency_keys`` holding a copy of the event it answers with,
expired by age alone (app/events/retention.py).

``ssehub_publish_as`` is redefined:
- it checks every row's caller and channel *before* taking the publish lock,
  and takes no lock at all when no row may be published, so a caller who may
  not publish never makes anybody wait;
- it answers a duplicate key with the first event in the same statement (the
  writer no longer looks it up afterwards: a failure after the commit was
  mistaken for a rollback and published twice);
- ``channels.pruned_through`` gets an index: every read of the log's tail asks
  which channels were pruned past a position.
The previous release's ``ssehub_publish`` is dropped: all instances must run
this release once it is migrated.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


PUBLISH_AS = """
CREATE FUNCTION ssehub_publish_as(
    p_user_ids bigint[], p_channels text[], p_types text[], p_datas text[], p_keys text[]
) RETURNS TABLE (
    row_number bigint, status text, event_id bigint, event_channel_id bigint,
    event_type text, event_data text, event_published_at timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    admins boolean[];  -- per row: the user's is_admin, NULL if there is no such user
    cids bigint[];     -- per row: the channel's id, NULL if there is no such channel
    fresh boolean[];   -- per row: to be inserted (allowed, and its key not used before)
    n_valid bigint;
    n_fresh bigint := 0;
    first_id bigint;
    at timestamptz;
BEGIN
    -- Rights first, without the lock: a row nobody may publish costs no wait.
    SELECT array_agg(usr.is_admin ORDER BY u.n), array_agg(ch.id ORDER BY u.n),
           count(*) FILTER (WHERE usr.is_admin AND ch.id IS NOT NULL)
    INTO admins, cids, n_valid
    FROM unnest(p_user_ids, p_channels) WITH ORDINALITY AS u(uid, cname, n)
    LEFT JOIN users usr ON usr.id = u.uid
    LEFT JOIN channels ch ON ch.name = u.cname;

    IF n_valid > 0 THEN
        -- The lock: no id is drawn by anyone else until this transaction commits.
        PERFORM pg_advisory_xact_lock(351819);  -- 0x55E4B, app.events.publisher.PUBLISH_LOCK
        -- A keyed row is fresh if its key is not stored yet and no earlier row of
        -- this call carries it (keys are read under the lock: no race).
        SELECT array_agg(f ORDER BY n), count(*) FILTER (WHERE f)
        INTO fresh, n_fresh
        FROM (
            SELECT u.n,
                   coalesce(admins[u.n], false) AND cids[u.n] IS NOT NULL AND (
                       u.k IS NULL OR (
                           row_number() OVER (
                               PARTITION BY coalesce(admins[u.n], false), cids[u.n], u.k
                               ORDER BY u.n) = 1
                           AND NOT EXISTS (
                               SELECT 1 FROM idempotency_keys ik
                               WHERE ik.channel_id = cids[u.n] AND ik.key = u.k))) AS f
            FROM unnest(p_keys) WITH ORDINALITY AS u(k, n)
        ) keyed;
    END IF;

    IF n_fresh > 0 THEN
        -- Only publishers draw ids, all under the lock: one nextval and one setval
        -- reserve the whole range, handed out in row order.
        first_id := nextval(pg_get_serial_sequence('events', 'id'));
        IF n_fresh > 1 THEN
            PERFORM setval(pg_get_serial_sequence('events', 'id'), first_id + n_fresh - 1);
        END IF;
        -- One publish time for the whole transaction: its events are published together.
        at := clock_timestamp();
        WITH numbered AS (
            SELECT cids[u.n] AS cid, u.t, u.d, u.k,
                   first_id + row_number() OVER (ORDER BY u.n) - 1 AS id
            FROM unnest(p_types, p_datas, p_keys) WITH ORDINALITY AS u(t, d, k, n)
            WHERE fresh[u.n]
        ), inserted AS (
            INSERT INTO events (id, channel_id, type, data, published_at)
            SELECT nb.id, nb.cid, nb.t, nb.d, at FROM numbered nb
        )
        INSERT INTO idempotency_keys (channel_id, key, event_id, type, data, published_at)
        SELECT nb.cid, nb.k, nb.id, nb.t, nb.d, at FROM numbered nb WHERE nb.k IS NOT NULL;
        PERFORM pg_notify('ssehub_events', (first_id + n_fresh - 1)::text);
    END IF;

    RETURN QUERY
    WITH req AS (
        SELECT u.n, u.k, admins[u.n] AS adm, cids[u.n] AS cid,
               coalesce(fresh[u.n], false) AS f,
               first_id - 1 + sum(CASE WHEN coalesce(fresh[u.n], false) THEN 1 ELSE 0 END)
                   OVER (ORDER BY u.n) AS id
        FROM unnest(p_keys) WITH ORDINALITY AS u(k, n)
    )
    SELECT req.n,
           CASE WHEN req.adm IS NULL THEN 'unauthorized'
                WHEN NOT req.adm THEN 'forbidden'
                WHEN req.cid IS NULL THEN 'not_found'
                WHEN req.f THEN 'created'
                ELSE 'duplicate' END,
           CASE WHEN req.f THEN req.id ELSE ik.event_id END,
           req.cid,
           ik.type::text,
           ik.data,
           CASE WHEN req.f THEN at ELSE ik.published_at END
    FROM req
    LEFT JOIN idempotency_keys ik
        ON NOT req.f AND req.adm AND ik.channel_id = req.cid AND ik.key = req.k
    ORDER BY req.n;
END
$$
"""

# The function of revision 0003, for the downgrade.
PUBLISH_AS_0003 = """
CREATE FUNCTION ssehub_publish_as(
    p_user_ids bigint[], p_channels text[], p_types text[], p_datas text[], p_keys text[]
) RETURNS TABLE (
    row_number bigint, status text, event_id bigint, event_channel_id bigint,
    event_published_at timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    admins boolean[];
    cids bigint[];
    n_valid bigint;
    first_id bigint;
    at timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(351819);
    SELECT array_agg(usr.is_admin ORDER BY u.n), array_agg(ch.id ORDER BY u.n),
           count(*) FILTER (WHERE usr.is_admin AND ch.id IS NOT NULL)
    INTO admins, cids, n_valid
    FROM unnest(p_user_ids, p_channels) WITH ORDINALITY AS u(uid, cname, n)
    LEFT JOIN users usr ON usr.id = u.uid
    LEFT JOIN channels ch ON ch.name = u.cname;
    IF n_valid > 0 THEN
        first_id := nextval(pg_get_serial_sequence('events', 'id'));
        IF n_valid > 1 THEN
            PERFORM setval(pg_get_serial_sequence('events', 'id'), first_id + n_valid - 1);
        END IF;
    END IF;
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

# The function of revision 0002, for the downgrade.
PUBLISH_0002 = """
CREATE FUNCTION ssehub_publish(
    p_channel_ids bigint[], p_types text[], p_datas text[], p_keys text[]
) RETURNS TABLE (
    event_id bigint, event_channel_id bigint, event_key text, event_published_at timestamptz
) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(351819);
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


def _run(script: str) -> None:
    """Each statement on its own: asyncpg prepares one statement per call."""
    for statement in script.split(";\n"):
        if statement.strip():
            op.execute(statement)


def upgrade() -> None:
    _run(
        """
CREATE TABLE idempotency_keys (
    channel_id bigint NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    key varchar(200) NOT NULL,
    event_id bigint NOT NULL,
    type varchar(64) NOT NULL,
    data text NOT NULL,
    published_at timestamptz NOT NULL,
    PRIMARY KEY (channel_id, key)
);
CREATE INDEX ix_idempotency_keys_published_at ON idempotency_keys (published_at);
INSERT INTO idempotency_keys (channel_id, key, event_id, type, data, published_at)
SELECT channel_id, idempotency_key, id, type, data, published_at
FROM events WHERE idempotency_key IS NOT NULL;
DROP INDEX uq_events_channel_idempotency_key;
DROP FUNCTION ssehub_publish(bigint[], text[], text[], text[]);
DROP FUNCTION ssehub_publish_as(bigint[], text[], text[], text[], text[]);
ALTER TABLE events DROP COLUMN idempotency_key;
CREATE INDEX ix_channels_pruned_through ON channels (pruned_through);
"""
    )
    op.execute(PUBLISH_AS)


def downgrade() -> None:
    _run(
        """
DROP FUNCTION ssehub_publish_as(bigint[], text[], text[], text[], text[]);
DROP INDEX ix_channels_pruned_through;
ALTER TABLE events ADD COLUMN idempotency_key varchar(200);
UPDATE events e SET idempotency_key = ik.key
FROM idempotency_keys ik WHERE ik.event_id = e.id AND ik.channel_id = e.channel_id;
CREATE UNIQUE INDEX uq_events_channel_idempotency_key ON events (channel_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
DROP TABLE idempotency_keys;
"""
    )
    op.execute(PUBLISH_AS_0003)
    op.execute(PUBLISH_0002)
