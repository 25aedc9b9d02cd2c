CREATE OR REPLACE FUNCTION public.ssehub_publish_as(p_user_ids bigint[], p_key_ids bigint[], p_channels text[], p_types text[], p_datas text[], p_keys text[], p_requests integer[], p_lock_wait_ms integer)
 RETURNS TABLE(row_number bigint, status text, event_id bigint, event_channel_id bigint, event_published_at timestamp with time zone, first_types text[], first_datas text[], tx_prev bigint)
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- The writer's publish (app/events/publisher.py): checks each row's caller and
-- channel, takes the publish lock, appends the rows that pass. One status per row,
-- in row order; a duplicate request answers with what its key was first used for
-- (ssehub_append).
DECLARE
    allowed boolean[]; -- per row: the caller may publish; false: a user who is no admin; NULL: no such caller
    cids bigint[];     -- per row: the channel's id, NULL if there is no such channel
    n_valid bigint;
    n bigint := cardinality(p_channels);
    one_ok boolean;
    one_cid bigint;
BEGIN
    -- The channels stay until this transaction ends: deleting one waits for it.
    PERFORM 1 FROM public.channels c
    WHERE c.name::text = ANY(ARRAY(SELECT DISTINCT u.c FROM unnest(p_channels) AS u(c))) FOR KEY SHARE;
    -- Rights first, without the publish lock: a row nobody may publish costs no
    -- wait. An API key's patterns were matched by the server; here it must still
    -- exist. Each distinct caller and channel is looked up once (a batch is a
    -- thousand rows of one caller and one channel).
    IF n > 1 AND NOT EXISTS (
        SELECT 1 FROM unnest(p_user_ids, p_key_ids, p_channels) AS u(uid, kid, cname)
        WHERE u.uid IS DISTINCT FROM p_user_ids[1] OR u.kid IS DISTINCT FROM p_key_ids[1]
           OR u.cname IS DISTINCT FROM p_channels[1])
    THEN
        SELECT CASE WHEN p_key_ids[1] IS NOT NULL THEN CASE WHEN k.id IS NULL THEN NULL ELSE true END
                    ELSE usr.is_admin END, ch.id
        INTO one_ok, one_cid
        FROM (SELECT 1) one
        LEFT JOIN public.users usr ON usr.id = p_user_ids[1]
        LEFT JOIN public.api_keys k ON k.id = p_key_ids[1]
        LEFT JOIN public.channels ch ON ch.name::text = p_channels[1];
        allowed := array_fill(one_ok, ARRAY[n::integer]);
        cids := array_fill(one_cid, ARRAY[n::integer]);
        n_valid := CASE WHEN one_ok AND one_cid IS NOT NULL THEN n ELSE 0 END;
    ELSE
    WITH rows AS (
        SELECT u.uid, u.kid, u.cname, u.n
        FROM unnest(p_user_ids, p_key_ids, p_channels) WITH ORDINALITY AS u(uid, kid, cname, n)
    ), checked AS (
        SELECT d.uid, d.kid, d.cname, ch.id AS cid,
               CASE WHEN d.kid IS NOT NULL THEN CASE WHEN k.id IS NULL THEN NULL ELSE true END
                    ELSE usr.is_admin END AS ok
        FROM (SELECT DISTINCT r.uid, r.kid, r.cname FROM rows r) d
        LEFT JOIN public.users usr ON usr.id = d.uid
        LEFT JOIN public.api_keys k ON k.id = d.kid
        LEFT JOIN public.channels ch ON ch.name::text = d.cname
    )
    SELECT array_agg(c.ok ORDER BY r.n), array_agg(c.cid ORDER BY r.n),
           count(*) FILTER (WHERE c.ok AND c.cid IS NOT NULL)
    INTO allowed, cids, n_valid
    FROM rows r
    JOIN checked c ON c.uid IS NOT DISTINCT FROM r.uid AND c.kid IS NOT DISTINCT FROM r.kid
                  AND c.cname IS NOT DISTINCT FROM r.cname;
    END IF;
    IF n_valid > 0 THEN
        -- No id is drawn by anyone else until this transaction commits.
        PERFORM public.ssehub_publish_lock(p_lock_wait_ms);
    END IF;
    IF n_valid = n THEN  -- every row may be published: the usual case
        RETURN QUERY
        SELECT a.row_number, CASE WHEN a.fresh THEN 'created' ELSE 'duplicate' END,
               a.event_id, cids[a.row_number], a.event_published_at, a.first_types,
               a.first_datas, a.tx_prev
        FROM public.ssehub_append(cids, p_types, p_datas, p_keys, p_requests) a;
        RETURN;
    END IF;
    RETURN QUERY
    WITH req AS (
        SELECT u.n, allowed[u.n] AS ok, cids[u.n] AS cid, u.t, u.d, u.k, u.r,
               coalesce(allowed[u.n], false) AND cids[u.n] IS NOT NULL AS valid
        FROM unnest(p_types, p_datas, p_keys, p_requests) WITH ORDINALITY AS u(t, d, k, r, n)
    ), valid AS (
        SELECT req.*, row_number() OVER (ORDER BY req.n) AS v FROM req WHERE req.valid
    ), appended AS (
        SELECT * FROM public.ssehub_append(
            (SELECT array_agg(valid.cid ORDER BY valid.n) FROM valid),
            (SELECT array_agg(valid.t ORDER BY valid.n) FROM valid),
            (SELECT array_agg(valid.d ORDER BY valid.n) FROM valid),
            (SELECT array_agg(valid.k ORDER BY valid.n) FROM valid),
            (SELECT array_agg(valid.r ORDER BY valid.n) FROM valid))
        WHERE n_valid > 0
    )
    SELECT req.n,
           CASE WHEN req.ok IS NULL THEN 'unauthorized'
                WHEN NOT req.ok THEN 'forbidden'
                WHEN req.cid IS NULL THEN 'not_found'
                WHEN a.fresh THEN 'created'
                ELSE 'duplicate' END,
           a.event_id, req.cid, a.event_published_at, a.first_types, a.first_datas, a.tx_prev
    FROM req
    LEFT JOIN valid ON valid.n = req.n
    LEFT JOIN appended a ON a.row_number = valid.v
    ORDER BY req.n;
END
$function$
