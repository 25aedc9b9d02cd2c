CREATE OR REPLACE FUNCTION public.ssehub_compact_json(j jsonb)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- jsonb as compact JSON text, as the server stores what it is sent. jsonb's own
-- text puts one space after every ',' and ':' between values, and none anywhere
-- else outside strings: this drops exactly those, skipping over every string
-- (a quote inside one is always escaped).
SELECT regexp_replace(j::text, '("(?:[^"\\]|\\.)*"|[,:]) ?', '\1', 'g')
$function$
