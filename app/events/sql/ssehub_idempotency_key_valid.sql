CREATE OR REPLACE FUNCTION public.ssehub_idempotency_key_valid(p_key text)
 RETURNS boolean
 LANGUAGE plpgsql
 IMMUTABLE PARALLEL SAFE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- An idempotency key: none, or 1-200 characters that are not all whitespace.
-- Whitespace is what Python's str.isspace() calls so, as the HTTP header's check
-- (app.events.routes): every one of those characters is listed here. PL/pgSQL
-- for the reason ssehub_event_type_valid gives.
BEGIN
    RETURN p_key IS NULL OR (
        length(p_key) <= 200
        AND btrim(p_key, U&'\0009\000A\000B\000C\000D\001C\001D\001E\001F\0020\0085\00A0\1680\2000\2001\2002\2003\2004\2005\2006\2007\2008\2009\200A\2028\2029\202F\205F\3000')
            <> '');
END
$function$
