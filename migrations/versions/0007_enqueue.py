"""ssehub_enqueue(): publish from the application's own transaction

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

An application calls ``ssehub_enqueue(channel, type, data, idempotency_key)``
in the transaction that changes its data. The call checks its arguments
(raising in that transaction: 22023 for a bad type or oversize data, P0002 for
an unknown channel) and writes one row to ``ssehub_inbox``, tagged with its
transaction's id; it takes no lock that anybody else waits for (not even a
foreign key's share lock on the channel: a transaction kept open for minutes
must not block deleting the channel either). Its NOTIFY fires at commit.

An instance's writer then calls ``ssehub_move_inbox()``, which under the
publish lock moves committed rows into ``events`` in one statement: see its
comments, and app/events/inbox.py for why nothing is lost, duplicated or
reordered.

``ssehub_append()`` is the one insert both publishing paths share (ids in row
order, idempotency keys, the NOTIFY); ``ssehub_publish_as`` now calls it.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND = """
CREATE FUNCTION ssehub_append(
    p_cids bigint[], p_types text[], p_datas text[], p_keys text[]
) RETURNS TABLE (
    row_number bigint, fresh boolean, event_id bigint, event_type text, event_data text,
    event_published_at timestamptz
) LANGUAGE plpgsql AS $$
-- Appends rows that may be published, in row order, to the log. The caller holds
-- the publish lock (pg_advisory_xact_lock(351819)): see app/events/publisher.py.
-- A keyed row is fresh if its key is not stored yet and no earlier row carries
-- it; a duplicate comes back with the event its key answers with.
DECLARE
    fresh_rows boolean[];
    n_fresh bigint;
    first_id bigint;
    at timestamptz := clock_timestamp();  -- one publish time per transaction
BEGIN
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
           CASE WHEN req.f THEN at ELSE ik.published_at END
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
    event_type text, event_data text, event_published_at timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    allowed boolean[]; -- per row: the caller may publish; false: a user who is no admin; NULL: no such caller
    cids bigint[];     -- per row: the channel's id, NULL if there is no such channel
    n_valid bigint;
BEGIN
    -- Rights first, without the lock: a row nobody may publish costs no wait. An
    -- API key's patterns were matched by the server; here it must still exist.
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
           a.event_id, req.cid, a.event_type, a.event_data, a.event_published_at
    FROM req
    LEFT JOIN valid ON valid.n = req.n
    LEFT JOIN appended a ON a.row_number = valid.v
    ORDER BY req.n;
END
$$
"""

COMPACT = """
CREATE FUNCTION ssehub_compact_json(j jsonb) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
-- jsonb as compact JSON text, as the server stores what it is sent: jsonb's own
-- output puts a space after every ':' and ','.
SELECT CASE jsonb_typeof(j)
    WHEN 'object' THEN '{' || coalesce((
        SELECT string_agg(to_json(e.k)::text || ':' || ssehub_compact_json(e.v), ',' ORDER BY e.o)
        FROM jsonb_each(j) WITH ORDINALITY AS e(k, v, o)), '') || '}'
    WHEN 'array' THEN '[' || coalesce((
        SELECT string_agg(ssehub_compact_json(e.v), ',' ORDER BY e.o)
        FROM jsonb_array_elements(j) WITH ORDINALITY AS e(v, o)), '') || ']'
    ELSE j::text
END
$$
"""

ENQUEUE = """
CREATE FUNCTION ssehub_enqueue(
    channel text, type text, data jsonb, idempotency_key text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
-- Called in the application's transaction: validate, write one inbox row, notify
-- at commit. No lock anybody waits for (see the migration's docstring).
DECLARE
    cid bigint;
    compact text;
    max_bytes integer;
BEGIN
    IF type IS NULL OR type !~ '^[A-Za-z0-9.:_-]{1,64}$' OR type LIKE 'ssehub.%' THEN
        RAISE EXCEPTION 'invalid event type %: 1-64 of A-Z a-z 0-9 . _ : -, not beginning with ssehub.',
            coalesce(quote_literal(type), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF idempotency_key IS NOT NULL AND (btrim(idempotency_key) = '' OR length(idempotency_key) > 200) THEN
        RAISE EXCEPTION 'invalid idempotency key: 1-200 characters' USING ERRCODE = '22023';
    END IF;
    IF data IS NULL THEN
        RAISE EXCEPTION 'data must not be NULL (use ''null''::jsonb)' USING ERRCODE = '22023';
    END IF;
    SELECT c.id INTO cid FROM channels c WHERE c.name = channel;
    IF cid IS NULL THEN
        RAISE EXCEPTION 'unknown channel %', quote_literal(channel) USING ERRCODE = 'P0002';
    END IF;
    compact := ssehub_compact_json(data);
    SELECT value::integer INTO max_bytes FROM ssehub_config WHERE name = 'max_event_bytes';
    IF octet_length(compact) > coalesce(max_bytes, 65536) THEN
        RAISE EXCEPTION 'data is % bytes as compact JSON; the limit is %',
            octet_length(compact), coalesce(max_bytes, 65536) USING ERRCODE = '22023';
    END IF;
    INSERT INTO ssehub_inbox (channel_id, type, data, idempotency_key)
    VALUES (cid, type, compact, idempotency_key);
    PERFORM pg_notify('ssehub_inbox', '');
END
$$
"""

MOVE_INBOX = """
CREATE FUNCTION ssehub_move_inbox(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
-- Moves committed inbox rows into the log, whole transactions at a time (about
-- p_limit rows, at least one transaction), oldest first; returns how many rows
-- it took. Under the publish lock, and in the caller's one transaction: the
-- rows leave the inbox exactly when their events are committed.
DECLARE
    cids bigint[];
    types text[];
    datas text[];
    keys text[];
    taken integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ssehub_inbox) THEN
        RETURN 0;  -- the common case costs no lock
    END IF;
    PERFORM pg_advisory_xact_lock(351819);  -- 0x55E4B, app.events.publisher.PUBLISH_LOCK
    -- A new snapshot after the lock: rows another mover took are gone from it.
    WITH txns AS (
        SELECT txid, min(id) AS first, count(*) AS n,
               sum(count(*)) OVER (ORDER BY min(id)) AS upto
        FROM ssehub_inbox GROUP BY txid
    ), picked AS (
        SELECT t.txid, t.first FROM txns t WHERE t.upto - t.n < p_limit
    ), moved AS (
        DELETE FROM ssehub_inbox i USING picked p WHERE i.txid = p.txid
        RETURNING i.id, p.first, i.channel_id, i.type, i.data, i.idempotency_key
    ), counted AS (
        SELECT count(*) AS taken FROM moved
    )
    -- Rows of a channel deleted meanwhile leave the inbox with the others, unpublished.
    SELECT array_agg(m.channel_id ORDER BY m.first, m.id),
           array_agg(m.type::text ORDER BY m.first, m.id),
           array_agg(m.data ORDER BY m.first, m.id),
           array_agg(m.idempotency_key::text ORDER BY m.first, m.id),
           (SELECT counted.taken FROM counted)
    INTO cids, types, datas, keys, taken
    FROM moved m JOIN channels c ON c.id = m.channel_id;
    IF cids IS NOT NULL THEN
        PERFORM ssehub_append(cids, types, datas, keys);
    END IF;
    RETURN coalesce(taken, 0);
END
$$
"""


def _run(script: str) -> None:
    """Each statement on its own (asyncpg prepares one statement per call), as the
    driver's own SQL: these bodies hold colons that are not bind parameters."""
    for statement in script.split(";\n"):
        if statement.strip():
            op.get_bind().exec_driver_sql(statement)


def upgrade() -> None:
    _run(
        """
CREATE TABLE ssehub_inbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    channel_id bigint NOT NULL,
    type varchar(64) NOT NULL,
    data text NOT NULL,
    idempotency_key varchar(200),
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ix_ssehub_inbox_txid ON ssehub_inbox (txid);
CREATE TABLE ssehub_config (name text PRIMARY KEY, value text NOT NULL);
DROP FUNCTION ssehub_publish_as(bigint[], bigint[], text[], text[], text[], text[])
"""
    )
    for function in (APPEND, PUBLISH_AS, COMPACT, ENQUEUE, MOVE_INBOX):
        op.get_bind().exec_driver_sql(function)
    # Callable only by roles granted it (ssehub grant-publisher), not by PUBLIC.
    _run("REVOKE ALL ON FUNCTION ssehub_enqueue(text, text, jsonb, text) FROM PUBLIC")


def downgrade() -> None:
    from importlib import util
    from pathlib import Path

    spec = util.spec_from_file_location(
        "publish_0006", Path(__file__).with_name("0006_identity.py")
    )
    assert spec and spec.loader
    previous = util.module_from_spec(spec)
    spec.loader.exec_module(previous)
    _run(
        """
DROP FUNCTION ssehub_move_inbox(integer);
DROP FUNCTION ssehub_enqueue(text, text, jsonb, text);
DROP FUNCTION ssehub_compact_json(jsonb);
DROP FUNCTION ssehub_publish_as(bigint[], bigint[], text[], text[], text[], text[]);
DROP FUNCTION ssehub_append(bigint[], text[], text[], text[]);
DROP TABLE ssehub_config;
DROP TABLE ssehub_inbox
"""
    )
    op.execute(previous.PUBLISH_AS)
