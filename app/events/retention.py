"""Retention: trims each channel's history to its ``max_events`` / ``max_age_seconds``.

Runs in every instance on a short interval; a try-lock makes one instance do
each sweep. Every deletion raises the channel's ``pruned_through`` to the
highest id removed, in the same transaction, and deletes oldest first, so
"every event of the channel at or below ``pruned_through`` is gone" stays
true. Whoever reads the log past a position below it (a resume, a slow
stream catching up, the broker's tail) knows events it had not delivered were
removed, and says so with ``ssehub.truncated`` instead of silently skipping
them (``app.events.log.read_page``).

Each statement deletes at most ``DELETE_CHUNK`` events, so a channel with a
huge backlog is trimmed over several sweeps, each within the query timeout.

It also expires idempotency keys 24 hours after their publish. Keys live in
their own table, so a key outlives an event that retention removed sooner.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.db import raw_connection

log = logging.getLogger("ssehub")

RETENTION_LOCK = 0x55E4C

_BOUNDED = (
    "SELECT id, max_events, max_age_seconds FROM public.channels "
    "WHERE max_events IS NOT NULL OR max_age_seconds IS NOT NULL"
)
DELETE_CHUNK = 10_000
_BY_COUNT = """
WITH cutoff AS (
    SELECT id FROM public.events WHERE channel_id = $1 ORDER BY id DESC OFFSET $2 LIMIT 1
), doomed AS (
    DELETE FROM public.events WHERE id IN (
        SELECT id FROM public.events WHERE channel_id = $1 AND id <= (SELECT id FROM cutoff)
        ORDER BY id LIMIT $3)
    RETURNING id
)
SELECT max(id) FROM doomed
"""
_BY_AGE = """
WITH doomed AS (
    DELETE FROM public.events WHERE id IN (
        SELECT id FROM public.events
        WHERE channel_id = $1 AND published_at < now() - make_interval(secs => $2)
        ORDER BY id LIMIT $3)
    RETURNING id
)
SELECT max(id) FROM doomed
"""
_RAISE_PRUNED = (
    "UPDATE public.channels SET pruned_through = greatest(pruned_through, $2) WHERE id = $1"
)
_EXPIRE_KEYS = (
    "DELETE FROM public.idempotency_keys WHERE ctid = ANY(ARRAY("
    "SELECT ctid FROM public.idempotency_keys WHERE published_at < now() - interval '24 hours' "
    "LIMIT $1))"
)


async def sweep(pool: Any) -> int:
    """One pass over every bounded channel; returns how many channels were trimmed."""
    trimmed = 0
    async with raw_connection(pool) as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK):
            return 0
        for channel_id, max_events, max_age in await conn.fetch(_BOUNDED):
            top = 0
            if max_events is not None:
                removed = await conn.fetchval(_BY_COUNT, channel_id, max_events, DELETE_CHUNK)
                top = max(top, removed or 0)
            if max_age is not None:
                removed = await conn.fetchval(_BY_AGE, channel_id, float(max_age), DELETE_CHUNK)
                top = max(top, removed or 0)
            if top:
                await conn.execute(_RAISE_PRUNED, channel_id, top)
                trimmed += 1
        await conn.execute(_EXPIRE_KEYS, DELETE_CHUNK)
    return trimmed


async def run(pool: Any, interval: float) -> None:
    """Sweep forever; a failed sweep (database away) is logged and retried."""
    while True:
        try:
            await sweep(pool)
        except Exception as exc:
            log.warning("retention sweep failed: %s", exc)
        await asyncio.sleep(interval)
