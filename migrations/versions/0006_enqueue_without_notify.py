"""Enqueueing at the speed of an INSERT: no NOTIFY per commit while a mover is awake

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10

- ``ssehub_enqueue`` notifies only while the flag ``ssehub_inbox_asleep`` (a
  sequence: 1 asleep, 0 awake) says no mover polls; a mover that is awake polls
  the inbox and clears the flag, and sets it again through ``ssehub_inbox_sleep``
  once the inbox stays empty (``app/events/inbox.py`` argues no wake-up is lost).
  A NOTIFY takes a lock every notifying commit waits for: enqueueing
  transactions no longer commit one at a time.
- ``ssehub_enqueue`` stores jsonb's own text and compacts it only when that is
  over the size limit; ``ssehub_move_inbox`` writes the events' compact JSON.
  Rows enqueued before this migration are compact already, and compacting them
  again leaves them as they are.
- ``ssehub_move_inbox`` takes whether its caller is awake and the horizon it
  waits for, and says whether the caller may sleep; it reads the line of
  transactions in one query, not one transaction at a time.
- ``ssehub_event_type_valid``, ``ssehub_idempotency_key_valid`` and
  ``ssehub_max_event_bytes`` are PL/pgSQL: as SQL functions called from
  ``ssehub_enqueue`` they were parsed and planned again in every transaction.

Instances of the previous release call ``ssehub_move_inbox`` with its old
arguments, which go: all instances must run this release once it is migrated.
"""

from collections.abc import Sequence
from typing import Any

from alembic import context

from app.events import functions

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _sql() -> Any:
    """0004's ``_sql``: statements as the driver's own SQL."""
    return context.script.get_revision("0004").module._sql


UPGRADE = (
    # Asleep until a mover says otherwise: enqueues notify.
    "CREATE SEQUENCE public.ssehub_inbox_asleep MINVALUE 0 MAXVALUE 1 START 1",
    # 0005 applied the files of the release it ran in: from empty, these.
    "DROP FUNCTION IF EXISTS public.ssehub_move_inbox(integer, integer)",
)


def upgrade() -> None:
    sql = _sql()
    for statement in UPGRADE:
        sql(statement)
    functions.apply(sql)


# 0005's definitions of the functions this migration replaced.
ENQUEUE = """CREATE OR REPLACE FUNCTION public.ssehub_enqueue(channel text, type text, data jsonb, idempotency_key text DEFAULT NULL::text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- Called in the application's transaction, with its owner's rights: validate,
-- write one inbox row, notify at commit. No lock anybody waits for
-- (app/events/inbox.py). Nothing the caller defined can run here: the path holds
-- only pg_catalog (and pg_temp, which is never searched for functions or
-- operators, and last for tables), and ssehub's own objects are named with
-- their schema.
DECLARE
    cid bigint;
    compact text;
    max_bytes integer;
BEGIN
    IF NOT public.ssehub_event_type_valid(type) THEN
        RAISE EXCEPTION 'invalid event type %: 1-64 of A-Z a-z 0-9 . _ : -, not beginning with ssehub.',
            coalesce(quote_literal(type), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF NOT public.ssehub_idempotency_key_valid(idempotency_key) THEN
        RAISE EXCEPTION 'invalid idempotency key: 1-200 characters, not all whitespace'
            USING ERRCODE = '22023';
    END IF;
    IF data IS NULL THEN
        RAISE EXCEPTION 'data must not be NULL (use ''null''::jsonb)' USING ERRCODE = '22023';
    END IF;
    SELECT c.id INTO cid FROM public.channels c WHERE c.name::text = channel;
    IF cid IS NULL THEN
        RAISE EXCEPTION 'unknown channel %', quote_literal(channel) USING ERRCODE = 'P0002';
    END IF;
    compact := public.ssehub_compact_json(data);
    max_bytes := public.ssehub_max_event_bytes();
    IF octet_length(compact) > max_bytes THEN
        RAISE EXCEPTION 'data is % bytes as compact JSON; the limit is %',
            octet_length(compact), max_bytes USING ERRCODE = '22023';
    END IF;
    INSERT INTO public.ssehub_inbox (channel_id, type, data, idempotency_key)
    VALUES (cid, type, compact, idempotency_key);
    PERFORM pg_notify('ssehub_inbox', '');
END
$function$
"""

MOVE_INBOX = """CREATE OR REPLACE FUNCTION public.ssehub_move_inbox(p_rows integer, p_lock_wait_ms integer)
 RETURNS TABLE(moved_taken integer, moved_more boolean, moved_stalled text, moved_id bigint, moved_channel_id bigint, moved_channel text, moved_type text, moved_data text, moved_published_at timestamp with time zone, moved_tx_prev bigint)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- Moves committed inbox rows into the log, under the publish lock and in the
-- caller's one transaction (app/events/inbox.py says why nothing is lost,
-- duplicated or reordered). Takes at most p_rows rows: whole transactions in the
-- order of their oldest row; a transaction larger than p_rows, p_rows of its
-- oldest rows when it is first in line. A transaction whose rows fail to append
-- (not for want of resources or time) is set aside in ssehub_inbox_stalled and
-- tried again after a growing pause, so it holds up nobody. Returns one row: how
-- many inbox rows it took, whether movable rows are left, and the error of a
-- transaction it set aside; then the events it appended, in id order.
DECLARE
    skip xid8[];       -- transactions set aside, not due yet
    tx xid8;
    first_tx xid8;     -- the transaction first in line
    n_txs integer;
    room integer;
    fits integer;
    ids bigint[];      -- the rows taken, in move order
    cids bigint[];
    types text[];
    datas text[];
    keys text[];
    appended bigint[]; -- per taken row: its event's id, NULL if not published
    at timestamptz;
    prev bigint;
    failure text;
    state text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.ssehub_inbox) THEN
        RETURN;  -- the common case costs no lock
    END IF;
    PERFORM public.ssehub_publish_lock(p_lock_wait_ms);
    -- Every statement from here reads a snapshot taken after the lock: rows another
    -- mover took are gone from it.
    skip := ARRAY(SELECT s.txid FROM public.ssehub_inbox_stalled s
                  WHERE s.retry_at > clock_timestamp());
    FOR attempt IN 1..2 LOOP
        BEGIN
            ids := '{}'; cids := '{}'; types := '{}'; datas := '{}'; keys := '{}';
            n_txs := 0;
            first_tx := NULL;
            room := p_rows;
            LOOP
                SELECT i.txid INTO tx FROM public.ssehub_inbox i
                WHERE i.txid <> ALL (skip) ORDER BY i.id LIMIT 1;
                EXIT WHEN NOT FOUND;
                SELECT count(*) INTO fits
                FROM (SELECT 1 FROM public.ssehub_inbox i WHERE i.txid = tx LIMIT room + 1) r;
                -- A transaction that would not fit waits to be first in line: one of
                -- up to p_rows rows is then moved whole, so its events are adjacent.
                EXIT WHEN n_txs > 0 AND fits > room;
                first_tx := coalesce(first_tx, tx);
                WITH taken AS (
                    DELETE FROM public.ssehub_inbox i WHERE i.id IN (
                        SELECT j.id FROM public.ssehub_inbox j WHERE j.txid = tx
                        ORDER BY j.id LIMIT room)
                    RETURNING i.id, i.channel_id, i.type, i.data, i.idempotency_key
                )
                SELECT ids || array_agg(t.id ORDER BY t.id),
                       cids || array_agg(t.channel_id ORDER BY t.id),
                       types || array_agg(t.type::text ORDER BY t.id),
                       datas || array_agg(t.data ORDER BY t.id),
                       keys || array_agg(t.idempotency_key::text ORDER BY t.id)
                INTO ids, cids, types, datas, keys
                FROM taken t;
                n_txs := n_txs + 1;
                room := p_rows - cardinality(ids);
                EXIT WHEN room <= 0 OR attempt = 2;  -- a second attempt: the first transaction alone
            END LOOP;
            -- The channels stay until this transaction ends; rows of a channel
            -- deleted meanwhile leave the inbox with the others, unpublished.
            PERFORM 1 FROM public.channels c WHERE c.id = ANY (cids) FOR KEY SHARE;
            WITH kept AS (
                SELECT u.n, row_number() OVER (ORDER BY u.n) AS k
                FROM unnest(cids) WITH ORDINALITY AS u(c, n)
                WHERE EXISTS (SELECT 1 FROM public.channels c WHERE c.id = u.c)
            ), added AS (
                SELECT a.row_number, a.fresh, a.event_id, a.event_published_at, a.tx_prev
                FROM public.ssehub_append(
                    ARRAY(SELECT cids[kept.n] FROM kept ORDER BY kept.n),
                    ARRAY(SELECT types[kept.n] FROM kept ORDER BY kept.n),
                    ARRAY(SELECT datas[kept.n] FROM kept ORDER BY kept.n),
                    ARRAY(SELECT keys[kept.n] FROM kept ORDER BY kept.n),
                    ARRAY(SELECT kept.k::integer FROM kept ORDER BY kept.n)) a
            )
            SELECT array_agg(CASE WHEN added.fresh THEN added.event_id END ORDER BY u.n),
                   max(added.event_published_at), min(added.tx_prev)
            INTO appended, at, prev
            FROM unnest(ids) WITH ORDINALITY AS u(id, n)
            LEFT JOIN kept ON kept.n = u.n
            LEFT JOIN added ON added.row_number = kept.k;
            EXIT;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS failure = MESSAGE_TEXT, state = RETURNED_SQLSTATE;
            -- Wanting resources or time, or the server going away, says nothing
            -- about the rows: fail the move, and the next one tries them again.
            IF left(state, 2) IN ('08', '40', '53', '54', '55', '57', '58', 'XX') THEN
                RAISE;
            END IF;
            IF n_txs > 1 AND attempt = 1 THEN
                CONTINUE;  -- which transaction failed? the first alone tells
            END IF;
            INSERT INTO public.ssehub_inbox_stalled AS s (txid, failures, retry_at, error)
            VALUES (first_tx, 1, clock_timestamp() + interval '1 second', failure)
            ON CONFLICT (txid) DO UPDATE
            SET failures = s.failures + 1,
                retry_at = clock_timestamp() + make_interval(secs => least(2 ^ s.failures, 300)),
                error = excluded.error;
            skip := skip || first_tx;
            ids := '{}';
            EXIT;
        END;
    END LOOP;
    IF cardinality(ids) > 0 AND EXISTS (SELECT 1 FROM public.ssehub_inbox_stalled) THEN
        DELETE FROM public.ssehub_inbox_stalled s
        WHERE NOT EXISTS (SELECT 1 FROM public.ssehub_inbox i WHERE i.txid = s.txid);
    END IF;
    RETURN QUERY SELECT cardinality(ids),
                        EXISTS (SELECT 1 FROM public.ssehub_inbox i WHERE i.txid <> ALL (skip)),
                        CASE WHEN cardinality(ids) = 0 THEN failure END,
                        NULL::bigint, NULL::bigint, NULL::text, NULL::text, NULL::text,
                        NULL::timestamptz, NULL::bigint;
    RETURN QUERY
    SELECT cardinality(ids), NULL::boolean, NULL::text, u.id, cids[u.n], c.name::text,
           types[u.n], datas[u.n], at, prev
    FROM unnest(appended) WITH ORDINALITY AS u(id, n)
    JOIN public.channels c ON c.id = cids[u.n]
    WHERE u.id IS NOT NULL
    ORDER BY u.id;
END
$function$
"""

EVENT_TYPE_VALID = r"""CREATE OR REPLACE FUNCTION public.ssehub_event_type_valid(p_type text)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- An event type: 1-64 of A-Z a-z 0-9 . _ : -, not beginning with the reserved
-- 'ssehub.' (app.events.schemas.EVENT_TYPE_PATTERN and RESERVED_PREFIX).
SELECT p_type IS NOT NULL
    AND p_type ~ '^[A-Za-z0-9.:_-]{1,64}$'
    AND NOT starts_with(p_type, 'ssehub.')
$function$
"""

IDEMPOTENCY_KEY_VALID = r"""CREATE OR REPLACE FUNCTION public.ssehub_idempotency_key_valid(p_key text)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- An idempotency key: none, or 1-200 characters that are not all whitespace.
-- Whitespace is what Python's str.isspace() calls so, as the HTTP header's check
-- (app.events.routes): every one of those characters is listed here.
SELECT p_key IS NULL OR (
    length(p_key) <= 200
    AND btrim(p_key, U&'\0009\000A\000B\000C\000D\001C\001D\001E\001F\0020\0085\00A0\1680\2000\2001\2002\2003\2004\2005\2006\2007\2008\2009\200A\2028\2029\202F\205F\3000')
        <> '')
$function$
"""

MAX_EVENT_BYTES = r"""CREATE OR REPLACE FUNCTION public.ssehub_max_event_bytes()
 RETURNS integer
 LANGUAGE sql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- The largest data ssehub_enqueue accepts, in bytes of compact JSON: the smallest
-- SSEHUB_MAX_EVENT_BYTES of the instances running (each declares its own and
-- keeps it fresh: app/events/enqueue_limit.py), so an enqueued event is one that
-- every instance would have accepted over HTTP. With no instance running, the
-- setting's default.
SELECT coalesce(min(l.max_event_bytes), 65536)
FROM public.ssehub_instance_limits l
WHERE l.expires_at > clock_timestamp()
$function$
"""


def downgrade() -> None:
    sql = _sql()
    for statement in (
        "DROP FUNCTION public.ssehub_inbox_sleep()",
        # The previous mover stores a row's data as it finds it.
        "UPDATE public.ssehub_inbox SET data = public.ssehub_compact_json(data::jsonb)",
        "DROP FUNCTION public.ssehub_move_inbox(integer, integer, boolean, xid8)",
        "SET LOCAL check_function_bodies = off",
        ENQUEUE,  # same arguments: replaced, so grants on it stay
        EVENT_TYPE_VALID,
        IDEMPOTENCY_KEY_VALID,
        MAX_EVENT_BYTES,
        MOVE_INBOX,
        "REVOKE ALL ON FUNCTION public.ssehub_move_inbox(integer, integer) FROM PUBLIC",
        "DROP SEQUENCE public.ssehub_inbox_asleep",
    ):
        sql(statement)
