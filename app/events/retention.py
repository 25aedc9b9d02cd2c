"""Retention: trims each channel's history to its ``max_events`` / ``max_age_seconds``.

Runs in every instance on a short interval; a try-lock makes one instance do
each sweep. Every deletion raises the channel's ``pruned_through`` to the
highest id removed, in the same transaction, so a stream resuming from a
position below it knows history no longer reaches back that far and says so
(``ssehub.truncated``) instead of silently skipping events.

It also expires idempotency keys after 24 hours, so a key can be reused.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.db import raw_connection

log = logging.getLogger("ssehub")

RETENTION_LOCK = 0x55E4C

_BOUNDED = (
    "SELECT id, max_events, max_age_seconds FROM channels "
    "WHERE max_events IS NOT NULL OR max_age_seconds IS NOT NULL"
)
_BY_COUNT = """
WITH cutoff AS (
    SELECT id FROM events WHERE channel_id = $1 ORDER BY id DESC OFFSET $2 LIMIT 1
), doomed AS (
    DELETE FROM events WHERE channel_id = $1 AND id <= (SELECT id FROM cutoff) RETURNING id
)
SELECT max(id) FROM doomed
"""
_BY_AGE = """
WITH doomed AS (
    DELETE FROM events
    WHERE channel_id = $1 AND published_at < now() - make_interval(secs => $2)
    RETURNING id
)
SELECT max(id) FROM doomed
"""
_RAISE_PRUNED = "UPDATE channels SET pruned_through = greatest(pruned_through, $2) WHERE id = $1"
_EXPIRE_KEYS = (
    "UPDATE events SET idempotency_key = NULL WHERE idempotency_key IS NOT NULL "
    "AND published_at < now() - interval '24 hours'"
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
                top = max(top, await conn.fetchval(_BY_COUNT, channel_id, max_events) or 0)
            if max_age is not None:
                top = max(top, await conn.fetchval(_BY_AGE, channel_id, float(max_age)) or 0)
            if top:
                await conn.execute(_RAISE_PRUNED, channel_id, top)
                trimmed += 1
        await conn.execute(_EXPIRE_KEYS)
    return trimmed


async def run(pool: Any, interval: float) -> None:
    """Sweep forever; a failed sweep (database away) is logged and retried."""
    while True:
        try:
            await sweep(pool)
        except Exception as exc:
            log.warning("retention sweep failed: %s", exc)
        await asyncio.sleep(interval)
