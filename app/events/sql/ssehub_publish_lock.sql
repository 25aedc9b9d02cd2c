CREATE OR REPLACE FUNCTION public.ssehub_publish_lock(p_wait_ms integer)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET lock_timeout TO '0'
AS $function$
-- Takes the publish lock for the rest of the caller's transaction: every
-- publishing transaction, on every instance, takes it before it draws ids (the
-- argument is in app/events/publisher.py). Waits at most p_wait_ms, then fails
-- with SQLSTATE 55P03, so no statement waits behind a holder for longer than its
-- client waits for it. The function's own SET of lock_timeout keeps the wait's
-- bound to this call: the caller's value is back when it returns.
BEGIN
    PERFORM set_config('lock_timeout', p_wait_ms::text, true);
    PERFORM pg_advisory_xact_lock(351819::bigint);  -- 0x55E4B, app.events.publisher.PUBLISH_LOCK
END
$function$
