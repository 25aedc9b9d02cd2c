"""Appending without a foreign-key check per event; the log's previous head

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

- ``events.channel_id`` loses its foreign key: its trigger ran once per
  inserted row, about a third of a 1,000-event batch's time in Postgres. What
  it guaranteed is kept another way: publishing locks the channel rows it
  writes to (``FOR KEY SHARE``, once per transaction), so deleting a channel
  waits for the publishes in flight, and a statement trigger on ``channels``
  deletes a deleted channel's events (also when a user's deletion cascades to
  its personal channel).
- ``ssehub_append`` also returns ``tx_prev``: the highest id in the log when
  the append began, under the publish lock. Every id up to it is committed,
  so an instance whose broker has delivered exactly up to ``tx_prev`` may hand
  the new events to its streams at once (app/realtime/broker.py, ``committed``).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _load(name: str):  # type: ignore[no-untyped-def]
    from importlib import util
    from pathlib import Path

    spec = util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec and spec.loader
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


APPEND = """
CREATE FUNCTION ssehub_append(
    p_cids bigint[], p_types text[], p_datas text[], p_keys text[]
) RETURNS TABLE (
    row_number bigint, fresh boolean, event_id bigint, event_type text, event_data text,
    event_published_at timestamptz, tx_prev bigint
) LANGUAGE plpgsql AS $$
-- Appends rows that may be published, in row order, to the log. The caller holds
-- the publish lock (pg_advisory_xact_lock(351819)) and has locked the channels'
-- rows FOR KEY SHARE: see app/events/publisher.py. A keyed row is fresh if its
-- key is not stored yet and no earlier row carries it; a duplicate comes back
-- with the event its key answers with.
DECLARE
    fresh_rows boolean[];
    n_fresh bigint;
    first_id bigint;
    head bigint;
    at timestamptz := clock_timestamp();  -- one publish time per transaction
BEGIN
    SELECT coalesce(max(e.id), 0) INTO head FROM events e;
    SELECT array_agg(f ORDER BY n), count(*) FILTER (WHERE f)
    INTO fresh_rows, n_fresh
    FROM (
        SELECT u.n, u.k IS NULL OR (
                   row_number() OVER (PARTITION BY u.c, u.k ORDER BY u.n) = 1
                   AND NOT EXISTS (
                       SELECT 1 FROM idempotency_keys ik
                       WHERE ik.channel_id = u.c AND ik.key = u.k)) AS f
        FROM unnest(p_cids, p_keys) WITH ORDINALITY AS u(c, k, n)
    ) keyed;
    IF n_fresh > 0 THEN
        -- Only publishers draw ids, all under the lock: one nextval and one setval
        -- reserve the whole range, handed out in row order.
        first_id := nextval(pg_get_serial_sequence('events', 'id'));
        IF n_fresh > 1 THEN
            PERFORM setval(pg_get_serial_sequence('events', 'id'), first_id + n_fresh - 1);
        END IF;
        WITH numbered AS (
            SELECT u.c, u.t, u.d, u.k, first_id + row_number() OVER (ORDER BY u.n) - 1 AS id
            FROM unnest(p_cids, p_types, p_datas, p_keys) WITH ORDINALITY AS u(c, t, d, k, n)
            WHERE fresh_rows[u.n]
        ), inserted AS (
            INSERT INTO events (id, channel_id, type, data, published_at)
            SELECT nb.id, nb.c, nb.t, nb.d, at FROM numbered nb
        )
        INSERT INTO idempotency_keys (channel_id, key, event_id, type, data, published_at)
        SELECT nb.c, nb.k, nb.id, nb.t, nb.d, at FROM numbered nb WHERE nb.k IS NOT NULL;
        PERFORM pg_notify('ssehub_events', (first_id + n_fresh - 1)::text);
    END IF;
    RETURN QUERY
    WITH req AS (
        SELECT u.n, u.c, u.k, fresh_rows[u.n] AS f,
               first_id - 1 + sum(CASE WHEN fresh_rows[u.n] THEN 1 ELSE 0 END)
                   OVER (ORDER BY u.n) AS id
        FROM unnest(p_cids, p_keys) WITH ORDINALITY AS u(c, k, n)
    )
    SELECT req.n, req.f,
           CASE WHEN req.f THEN req.id ELSE ik.event_id END,
           ik.type::text, ik.data,
           CASE WHEN req.f THEN at ELSE ik.published_at END,
           head
    FROM req
    LEFT JOIN idempotency_keys ik ON NOT req.f AND ik.channel_id = req.c AND ik.key = req.k
    ORDER BY req.n;
END
$$
"""

PUBLISH_AS = """
CREATE FUNCTION ssehub_publish_as(
    p_user_ids bigint[], p_key_ids bigint[], p_channels text[], p_types text[],
    p_datas text[], p_keys text[]
) RETURNS TABLE (
    row_number bigint, status text, event_id bigint, event_channel_id bigint,
    event_type text, event_data text, event_published_at timestamptz, tx_prev bigint
) LANGUAGE plpgsql AS $$
DECLARE
    allowed boolean[]; -- per row: the caller may publish; false: a user who is no admin; NULL: no such caller
    cids bigint[];     -- per row: the channel's id, NULL if there is no such channel
    n_valid bigint;
BEGIN
    -- The channels stay until this transaction ends: deleting one waits for it.
    PERFORM 1 FROM channels WHERE name = ANY(p_channels) FOR KEY SHARE;
    -- Rights first, without the publish lock: a row nobody may publish costs no
    -- wait. An API key's patterns were matched by the server; here it must exist.
    SELECT array_agg(CASE WHEN u.kid IS NOT NULL THEN CASE WHEN k.id IS NULL THEN NULL ELSE true END
                          ELSE usr.is_admin END ORDER BY u.n),
           array_agg(ch.id ORDER BY u.n)
    INTO allowed, cids
    FROM unnest(p_user_ids, p_key_ids, p_channels) WITH ORDINALITY AS u(uid, kid, cname, n)
    LEFT JOIN users usr ON usr.id = u.uid
    LEFT JOIN api_keys k ON k.id = u.kid
    LEFT JOIN channels ch ON ch.name = u.cname;
    SELECT count(*) INTO n_valid
    FROM generate_subscripts(allowed, 1) AS i WHERE allowed[i] AND cids[i] IS NOT NULL;
    IF n_valid > 0 THEN
        -- The lock: no id is drawn by anyone else until this transaction commits.
        PERFORM pg_advisory_xact_lock(351819);  -- 0x55E4B, app.events.publisher.PUBLISH_LOCK
    END IF;
    RETURN QUERY
    WITH req AS (
        SELECT u.n, allowed[u.n] AS ok, cids[u.n] AS cid, u.t, u.d, u.k,
               coalesce(allowed[u.n], false) AND cids[u.n] IS NOT NULL AS valid
        FROM unnest(p_types, p_datas, p_keys) WITH ORDINALITY AS u(t, d, k, n)
    ), valid AS (
        SELECT req.*, row_number() OVER (ORDER BY req.n) AS v FROM req WHERE req.valid
    ), appended AS (
        SELECT * FROM ssehub_append(
            (SELECT array_agg(valid.cid ORDER BY valid.n) FROM valid),
            (SELECT array_agg(valid.t ORDER BY valid.n) FROM valid),
            (SELECT array_agg(valid.d ORDER BY valid.n) FROM valid),
            (SELECT array_agg(valid.k ORDER BY valid.n) FROM valid))
        WHERE n_valid > 0
    )
    SELECT req.n,
           CASE WHEN req.ok IS NULL THEN 'unauthorized'
                WHEN NOT req.ok THEN 'forbidden'
                WHEN req.cid IS NULL THEN 'not_found'
                WHEN a.fresh THEN 'created'
                ELSE 'duplicate' END,
           a.event_id, req.cid, a.event_type, a.event_data, a.event_published_at, a.tx_prev
    FROM req
    LEFT JOIN valid ON valid.n = req.n
    LEFT JOIN appended a ON a.row_number = valid.v
    ORDER BY req.n;
END
$$
"""

MOVE_INBOX = """
CREATE FUNCTION ssehub_move_inbox(p_limit integer) RETURNS TABLE (
    moved_taken integer, moved_id bigint, moved_channel_id bigint, moved_channel text,
    moved_type text, moved_data text, moved_published_at timestamptz, moved_tx_prev bigint
) LANGUAGE plpgsql AS $$
-- Moves committed inbox rows into the log, whole transactions at a time (about
-- p_limit rows, at least one transaction), oldest first. Under the publish lock,
-- and in the caller's one transaction: the rows leave the inbox exactly when
-- their events are committed. Returns one row saying how many inbox rows it
-- took (none if the inbox was empty), then the events it appended, in id order.
DECLARE
    cids bigint[];
    types text[];
    datas text[];
    keys text[];
    n_taken integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ssehub_inbox) THEN
        RETURN;  -- the common case costs no lock
    END IF;
    PERFORM pg_advisory_xact_lock(351819);  -- 0x55E4B, app.events.publisher.PUBLISH_LOCK
    -- A new snapshot after the lock: rows another mover took are gone from it.
    -- Their channels stay until this transaction ends.
    PERFORM 1 FROM channels WHERE id IN (SELECT i.channel_id FROM ssehub_inbox i) FOR KEY SHARE;
    WITH txns AS (
        SELECT i.txid, min(i.id) AS first, count(*) AS n,
               sum(count(*)) OVER (ORDER BY min(i.id)) AS upto
        FROM ssehub_inbox i GROUP BY i.txid
    ), picked AS (
        SELECT t.txid, t.first FROM txns t WHERE t.upto - t.n < p_limit
    ), moved AS (
        DELETE FROM ssehub_inbox i USING picked p WHERE i.txid = p.txid
        RETURNING i.id, p.first, i.channel_id, i.type, i.data, i.idempotency_key
    ), counted AS (
        SELECT count(*) AS n FROM moved
    )
    -- Rows of a channel deleted meanwhile leave the inbox with the others, unpublished.
    SELECT array_agg(m.channel_id ORDER BY m.first, m.id),
           array_agg(m.type::text ORDER BY m.first, m.id),
           array_agg(m.data ORDER BY m.first, m.id),
           array_agg(m.idempotency_key::text ORDER BY m.first, m.id),
           (SELECT counted.n FROM counted)
    INTO cids, types, datas, keys, n_taken
    FROM moved m JOIN channels c ON c.id = m.channel_id;
    RETURN QUERY SELECT coalesce(n_taken, 0), NULL::bigint, NULL::bigint, NULL::text,
                        NULL::text, NULL::text, NULL::timestamptz, NULL::bigint;
    IF cids IS NOT NULL THEN
        RETURN QUERY
        SELECT n_taken, a.event_id, cids[a.row_number], c.name::text, types[a.row_number],
               datas[a.row_number], a.event_published_at, a.tx_prev
        FROM ssehub_append(cids, types, datas, keys) a
        JOIN channels c ON c.id = cids[a.row_number]
        WHERE a.fresh
        ORDER BY a.event_id;
    END IF;
END
$$
"""

DELETE_EVENTS = """
CREATE FUNCTION ssehub_channels_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM events WHERE channel_id IN (SELECT id FROM gone);
    RETURN NULL;
END
$$
"""


def _sql(statement: str) -> None:
    op.get_bind().exec_driver_sql(statement)


def upgrade() -> None:
    for statement in (
        "ALTER TABLE events DROP CONSTRAINT events_channel_id_fkey",
        "DROP FUNCTION ssehub_move_inbox(integer)",
        "DROP FUNCTION ssehub_publish_as(bigint[], bigint[], text[], text[], text[], text[])",
        "DROP FUNCTION ssehub_append(bigint[], text[], text[], text[])",
        APPEND,
        PUBLISH_AS,
        MOVE_INBOX,
        DELETE_EVENTS,
        "CREATE TRIGGER ssehub_channels_deleted AFTER DELETE ON channels "
        "REFERENCING OLD TABLE AS gone FOR EACH STATEMENT "
        "EXECUTE FUNCTION ssehub_channels_deleted()",
    ):
        _sql(statement)


def downgrade() -> None:
    previous = _load("0007_enqueue")
    for statement in (
        "DROP TRIGGER ssehub_channels_deleted ON channels",
        "DROP FUNCTION ssehub_channels_deleted()",
        "DROP FUNCTION ssehub_move_inbox(integer)",
        "DROP FUNCTION ssehub_publish_as(bigint[], bigint[], text[], text[], text[], text[])",
        "DROP FUNCTION ssehub_append(bigint[], text[], text[], text[])",
        previous.APPEND,
        previous.PUBLISH_AS,
        previous.MOVE_INBOX,
        "DELETE FROM events e WHERE NOT EXISTS (SELECT 1 FROM channels c WHERE c.id = e.channel_id)",
        "ALTER TABLE events ADD CONSTRAINT events_channel_id_fkey FOREIGN KEY (channel_id) "
        "REFERENCES channels (id) ON DELETE CASCADE",
    ):
        _sql(statement)
