CREATE OR REPLACE FUNCTION public.ssehub_move_inbox(p_rows integer, p_lock_wait_ms integer, p_awake boolean, p_horizon xid8)
 RETURNS TABLE(moved_taken integer, moved_more boolean, moved_stalled text, moved_id bigint, moved_channel_id bigint, moved_channel text, moved_type text, moved_data text, moved_published_at timestamp with time zone, moved_tx_prev bigint, moved_may_sleep boolean)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- Moves committed inbox rows into the log, under the publish lock and in the
-- caller's one transaction (app/events/inbox.py says why nothing is lost,
-- duplicated or reordered). Takes at most p_rows rows: whole transactions in the
-- order of their oldest row; a transaction larger than p_rows, p_rows of its
-- oldest rows when it is first in line. A transaction whose rows fail to append
-- (not for want of resources or time) is set aside in ssehub_inbox_stalled and
-- tried again after a growing pause, so it holds up nobody. The rows hold jsonb's
-- text: the events get it as compact JSON. Returns one row: how
-- many inbox rows it took, whether movable rows are left, the error of a
-- transaction it set aside, and whether the caller may sleep (nothing moved, no
-- movable row left, and: every transaction older than p_horizon has ended, or
-- without a horizon, the flag says the movers are asleep); then the events it
-- appended, in id order. A mover that is awake says so (p_awake): the flag
-- ssehub_enqueue reads is then cleared, and enqueues notify nobody.
DECLARE
    skip xid8[];       -- transactions set aside, not due yet
    first_tx xid8;     -- the transaction first in line
    txs xid8[];        -- the whole transactions taken, in line order
    pick bigint[];     -- the rows taken
    n_txs integer;
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
    asleep boolean;    -- the flag ssehub_enqueue reads
    pending boolean;
    may_sleep boolean;
    more boolean;
BEGIN
    asleep := (SELECT s.last_value FROM public.ssehub_inbox_asleep s) <> 0;
    IF p_awake AND asleep THEN
        PERFORM setval('public.ssehub_inbox_asleep'::regclass, 0);
        asleep := false;
    END IF;
    -- One snapshot for both: a transaction it sees ended has its rows in it.
    SELECT EXISTS (SELECT 1 FROM public.ssehub_inbox),
           coalesce(pg_snapshot_xmin(pg_current_snapshot()) >= p_horizon, asleep)
    INTO pending, may_sleep;
    IF NOT pending THEN  -- the common case costs no lock
        RETURN QUERY SELECT 0, false, NULL::text, NULL::bigint, NULL::bigint, NULL::text,
                            NULL::text, NULL::text, NULL::timestamptz, NULL::bigint, may_sleep;
        RETURN;
    END IF;
    PERFORM public.ssehub_publish_lock(p_lock_wait_ms);
    -- Every statement from here reads a snapshot taken after the lock: rows another
    -- mover took are gone from it.
    skip := ARRAY(SELECT s.txid FROM public.ssehub_inbox_stalled s
                  WHERE s.retry_at > clock_timestamp());
    FOR attempt IN 1..2 LOOP
        BEGIN
            -- The transactions in line: those of the p_rows oldest movable rows (no
            -- other one's oldest row comes before them), in the order of their oldest
            -- row, with the rows up to and including each. Whole ones while they fit;
            -- one that would not fit waits to be first in line: one of up to p_rows
            -- rows is then moved whole, so its events are adjacent. A larger one
            -- first in line gives its p_rows oldest rows. A second attempt: the first
            -- transaction alone.
            WITH oldest AS (
                SELECT i.id, i.txid FROM public.ssehub_inbox i
                WHERE i.txid <> ALL (skip) ORDER BY i.id LIMIT p_rows
            ), line AS (
                SELECT o.txid, min(o.id) AS first_id,
                       (SELECT count(*) FROM public.ssehub_inbox i WHERE i.txid = o.txid) AS size
                FROM oldest o GROUP BY o.txid
            ), running AS (
                SELECT l.txid, row_number() OVER w AS k, sum(l.size) OVER w AS upto
                FROM line l WINDOW w AS (ORDER BY l.first_id)
            )
            SELECT (array_agg(r.txid ORDER BY r.k))[1],
                   coalesce(array_agg(r.txid ORDER BY r.k)
                            FILTER (WHERE r.upto <= p_rows AND (attempt = 1 OR r.k = 1)), '{}')
            INTO first_tx, txs
            FROM running r;
            n_txs := greatest(cardinality(txs), 1);
            IF cardinality(txs) > 0 THEN
                pick := ARRAY(SELECT j.id FROM public.ssehub_inbox j WHERE j.txid = ANY (txs));
            ELSE
                pick := ARRAY(SELECT j.id FROM public.ssehub_inbox j WHERE j.txid = first_tx
                              ORDER BY j.id LIMIT p_rows);
            END IF;
            WITH taken AS (
                DELETE FROM public.ssehub_inbox i WHERE i.id = ANY (pick)
                RETURNING i.id, i.txid, i.channel_id, i.type, i.data, i.idempotency_key
            ), ordered AS (
                SELECT t.*, coalesce(o.k, 1) AS k
                FROM taken t LEFT JOIN unnest(txs) WITH ORDINALITY AS o(txid, k) ON o.txid = t.txid
            )
            SELECT coalesce(array_agg(t.id ORDER BY t.k, t.id), '{}'),
                   coalesce(array_agg(t.channel_id ORDER BY t.k, t.id), '{}'),
                   coalesce(array_agg(t.type::text ORDER BY t.k, t.id), '{}'),
                   coalesce(array_agg(public.ssehub_compact_json(t.data::jsonb) ORDER BY t.k, t.id), '{}'),
                   coalesce(array_agg(t.idempotency_key::text ORDER BY t.k, t.id), '{}')
            INTO ids, cids, types, datas, keys
            FROM ordered t;
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
    more := EXISTS (SELECT 1 FROM public.ssehub_inbox i WHERE i.txid <> ALL (skip));
    RETURN QUERY SELECT cardinality(ids), more,
                        CASE WHEN cardinality(ids) = 0 THEN failure END,
                        NULL::bigint, NULL::bigint, NULL::text, NULL::text, NULL::text,
                        NULL::timestamptz, NULL::bigint,
                        may_sleep AND cardinality(ids) = 0 AND NOT more;
    RETURN QUERY
    SELECT cardinality(ids), NULL::boolean, NULL::text, u.id, cids[u.n], c.name::text,
           types[u.n], datas[u.n], at, prev, NULL::boolean
    FROM unnest(appended) WITH ORDINALITY AS u(id, n)
    JOIN public.channels c ON c.id = cids[u.n]
    WHERE u.id IS NOT NULL
    ORDER BY u.id;
END
$function$
