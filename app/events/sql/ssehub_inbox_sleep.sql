CREATE OR REPLACE FUNCTION public.ssehub_inbox_sleep()
 RETURNS xid8
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- A mover that found the inbox empty for a while stops promising to poll: from
-- now on ssehub_enqueue notifies. Returns the horizon: every transaction that
-- may have read the flag before it was set has an id below it, and the mover
-- polls until they have all ended (ssehub_move_inbox's p_horizon) before it
-- sleeps (app/events/inbox.py). The flag is a sequence: read and set outside
-- any snapshot, so a caller in a repeatable-read transaction reads it as it is.
BEGIN
    PERFORM setval('public.ssehub_inbox_asleep'::regclass, 1);
    -- A snapshot taken after the flag was set.
    RETURN pg_snapshot_xmax(pg_current_snapshot());
END
$function$
