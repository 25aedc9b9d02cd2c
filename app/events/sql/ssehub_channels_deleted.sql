CREATE OR REPLACE FUNCTION public.ssehub_channels_deleted()
 RETURNS trigger
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- After a statement deleted channels: their events go too (events has no foreign
-- key: publishing locks the channel's row instead).
BEGIN
    DELETE FROM public.events e WHERE e.channel_id IN (SELECT g.id FROM gone g);
    RETURN NULL;
END
$function$
