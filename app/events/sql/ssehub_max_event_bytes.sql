CREATE OR REPLACE FUNCTION public.ssehub_max_event_bytes()
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- The largest data ssehub_enqueue accepts, in bytes of compact JSON: the smallest
-- SSEHUB_MAX_EVENT_BYTES of the instances running (each declares its own and
-- keeps it fresh: app/events/enqueue_limit.py), so an enqueued event is one that
-- every instance would have accepted over HTTP. With no instance running, the
-- setting's default. PL/pgSQL for the reason ssehub_event_type_valid gives: its
-- query is planned once per session.
BEGIN
    RETURN (SELECT coalesce(min(l.max_event_bytes), 65536)
            FROM public.ssehub_instance_limits l
            WHERE l.expires_at > clock_timestamp());
END
$function$
