CREATE OR REPLACE FUNCTION public.ssehub_append(p_cids bigint[], p_types text[], p_datas text[], p_keys text[], p_requests integer[])
 RETURNS TABLE(row_number bigint, fresh boolean, event_id bigint, event_published_at timestamp with time zone, first_types text[], first_datas text[], tx_prev bigint)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- Appends rows that may be published, in row order, to the log. The caller holds
-- the publish lock (ssehub_publish_lock) and has locked the channels' rows FOR KEY
-- SHARE: see app/events/publisher.py. p_requests numbers the request each row
-- belongs to (a batch is one request; its rows are adjacent). A keyed request is
-- fresh, all its rows, if its key is not stored on its channel yet and no earlier
-- request carries it. A duplicate request's rows come back not fresh, with the
-- first event's id and publish time, and on its first row the types and data of
-- every event the key was first used for (their ids follow the first's).
DECLARE
    n bigint := coalesce(cardinality(p_cids), 0);
    keyed boolean := EXISTS (SELECT 1 FROM unnest(p_keys) k WHERE k IS NOT NULL);
    fresh_rows boolean[];
    n_fresh bigint := n;
    first_id bigint;
    head bigint;
    at timestamptz := clock_timestamp();  -- one publish time per transaction
BEGIN
    SELECT coalesce(max(e.id), 0) INTO head FROM public.events e;
    IF keyed THEN
        SELECT array_agg(checked.f ORDER BY checked.n), count(*) FILTER (WHERE checked.f)
        INTO fresh_rows, n_fresh
        FROM (
            SELECT u.n, u.k IS NULL OR (
                       u.r = min(u.r) OVER (PARTITION BY u.c, u.k)
                       AND NOT EXISTS (
                           SELECT 1 FROM public.idempotency_keys ik
                           WHERE ik.channel_id = u.c AND ik.key::text = u.k)) AS f
            FROM unnest(p_cids, p_keys, p_requests) WITH ORDINALITY AS u(c, k, r, n)
        ) checked;
    END IF;
    IF n_fresh > 0 THEN
        -- Only publishers draw ids, all under the lock: one nextval and one setval
        -- reserve the whole range, handed out in row order.
        first_id := nextval(pg_get_serial_sequence('public.events', 'id'));
        IF n_fresh > 1 THEN
            PERFORM setval(pg_get_serial_sequence('public.events', 'id'), first_id + n_fresh - 1);
        END IF;
        IF NOT keyed THEN  -- nothing to remember
            INSERT INTO public.events (id, channel_id, type, data, published_at)
            SELECT first_id + u.n - 1, u.c, u.t, u.d, at
            FROM unnest(p_cids, p_types, p_datas) WITH ORDINALITY AS u(c, t, d, n);
        ELSE
            WITH numbered AS (
                SELECT u.c, u.t, u.d, u.k, u.r, u.n,
                       first_id + row_number() OVER (ORDER BY u.n) - 1 AS id
                FROM unnest(p_cids, p_types, p_datas, p_keys, p_requests)
                     WITH ORDINALITY AS u(c, t, d, k, r, n)
                WHERE fresh_rows[u.n]
            ), inserted AS (
                INSERT INTO public.events (id, channel_id, type, data, published_at)
                SELECT nb.id, nb.c, nb.t, nb.d, at FROM numbered nb
            )
            INSERT INTO public.idempotency_keys (channel_id, key, event_id, types, datas, published_at)
            SELECT nb.c, nb.k, min(nb.id), array_agg(nb.t ORDER BY nb.n), array_agg(nb.d ORDER BY nb.n), at
            FROM numbered nb WHERE nb.k IS NOT NULL
            GROUP BY nb.c, nb.k, nb.r;
        END IF;
        PERFORM pg_notify('ssehub_events', (first_id + n_fresh - 1)::text);
    END IF;
    IF NOT keyed THEN
        RETURN QUERY
        SELECT g.i, true, first_id + g.i - 1, at, NULL::text[], NULL::text[], head
        FROM generate_series(1::bigint, n) AS g(i);
        RETURN;
    END IF;
    RETURN QUERY
    WITH req AS (
        SELECT u.n, u.c, u.k, fresh_rows[u.n] AS f,
               first_id - 1 + sum(CASE WHEN fresh_rows[u.n] THEN 1 ELSE 0 END)
                   OVER (ORDER BY u.n) AS id,
               u.n = min(u.n) OVER (PARTITION BY u.r) AS opens
        FROM unnest(p_cids, p_keys, p_requests) WITH ORDINALITY AS u(c, k, r, n)
    )
    SELECT req.n, req.f,
           CASE WHEN req.f THEN req.id ELSE ik.event_id END,
           CASE WHEN req.f THEN at ELSE ik.published_at END,
           CASE WHEN req.opens THEN ik.types END,
           CASE WHEN req.opens THEN ik.datas END,
           head
    FROM req
    LEFT JOIN public.idempotency_keys ik
        ON NOT req.f AND ik.channel_id = req.c AND ik.key::text = req.k
    ORDER BY req.n;
END
$function$
