CREATE OR REPLACE FUNCTION public.ssehub_event_type_valid(p_type text)
 RETURNS boolean
 LANGUAGE plpgsql
 IMMUTABLE PARALLEL SAFE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- An event type: 1-64 of A-Z a-z 0-9 . _ : -, not beginning with the reserved
-- 'ssehub.' (app.events.schemas.EVENT_TYPE_PATTERN and RESERVED_PREFIX).
-- PL/pgSQL, not SQL: a SQL function called from ssehub_enqueue is parsed and
-- planned again in every transaction, this one's expression once per session.
BEGIN
    RETURN p_type IS NOT NULL
        AND p_type ~ '^[A-Za-z0-9.:_-]{1,64}$'
        AND NOT starts_with(p_type, 'ssehub.');
END
$function$
