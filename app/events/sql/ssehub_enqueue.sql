CREATE OR REPLACE FUNCTION public.ssehub_enqueue(channel text, type text, data jsonb, idempotency_key text DEFAULT NULL::text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- Called in the application's transaction, with its owner's rights: validate,
-- write one inbox row, and notify at commit only if the movers may be asleep.
-- No lock anybody waits for, and nothing that serialises commits while a mover
-- is awake (app/events/inbox.py). Nothing the caller defined can run here: the
-- path holds only pg_catalog (and pg_temp, which is never searched for functions
-- or operators, and last for tables), and ssehub's own objects are named with
-- their schema.
DECLARE
    body text := data::text;  -- jsonb's text: compact JSON is never longer
    max_bytes integer;
    asleep bigint;
BEGIN
    IF NOT public.ssehub_event_type_valid(type) THEN
        RAISE EXCEPTION 'invalid event type %: 1-64 of A-Z a-z 0-9 . _ : -, not beginning with ssehub.',
            coalesce(quote_literal(type), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF idempotency_key IS NOT NULL AND NOT public.ssehub_idempotency_key_valid(idempotency_key) THEN
        RAISE EXCEPTION 'invalid idempotency key: 1-200 characters, not all whitespace'
            USING ERRCODE = '22023';
    END IF;
    IF body IS NULL THEN
        RAISE EXCEPTION 'data must not be NULL (use ''null''::jsonb)' USING ERRCODE = '22023';
    END IF;
    max_bytes := public.ssehub_max_event_bytes();
    -- Compacted (the mover stores compact JSON) only when jsonb's spaced text is
    -- over the limit: below it, the compact form is too.
    IF octet_length(body) > max_bytes
       AND octet_length(public.ssehub_compact_json(data)) > max_bytes THEN
        RAISE EXCEPTION 'data is % bytes as compact JSON; the limit is %',
            octet_length(public.ssehub_compact_json(data)), max_bytes USING ERRCODE = '22023';
    END IF;
    -- The channel by its unique index on name; the movers' flag read in the same
    -- statement, after this transaction has its id (the order inbox.py relies on).
    INSERT INTO public.ssehub_inbox (channel_id, type, data, idempotency_key)
    SELECT c.id, type, body, idempotency_key FROM public.channels c WHERE c.name = channel
    RETURNING (SELECT s.last_value FROM public.ssehub_inbox_asleep s) INTO asleep;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown channel %', quote_literal(channel) USING ERRCODE = 'P0002';
    END IF;
    IF asleep <> 0 THEN
        PERFORM pg_notify('ssehub_inbox', '');
    END IF;
END
$function$
