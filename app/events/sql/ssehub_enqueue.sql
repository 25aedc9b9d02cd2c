CREATE OR REPLACE FUNCTION public.ssehub_enqueue(channel text, type text, data jsonb, idempotency_key text DEFAULT NULL::text)
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
