"""The size limit of ``ssehub_enqueue``: the smallest of the running instances'.

An event published over HTTP is checked by the instance that receives it,
against its own ``SSEHUB_MAX_EVENT_BYTES``. An event enqueued from SQL reaches
no instance first, so the database checks it, and the answer must not depend
on which instance happened to start last. Each instance (each process)
declares its limit in ``ssehub_instance_limits`` as it starts, renews the
declaration every ``RENEW_SECONDS`` and withdraws it as it stops; a
declaration not renewed lapses after ``LAPSE_SECONDS``, so a killed instance
stops counting by itself. ``ssehub_max_event_bytes()`` takes the smallest
declaration in force: an enqueued event is one that every running instance
would have accepted over HTTP. With none in force (no instance running), it
is the setting's default, 65536.

Instances at 64 KiB and at 1 MiB side by side: SQL accepts up to 64 KiB while
both run, whichever started first, and up to 1 MiB once the smaller one has
stopped (at once) or was killed (within ``LAPSE_SECONDS``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from app.db import raw_connection

log = logging.getLogger("ssehub")

RENEW_SECONDS = 5.0
LAPSE_SECONDS = 15.0

_DECLARE = """
WITH lapsed AS (DELETE FROM public.ssehub_instance_limits WHERE expires_at < clock_timestamp())
INSERT INTO public.ssehub_instance_limits (instance, max_event_bytes, expires_at)
VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (instance) DO UPDATE SET expires_at = excluded.expires_at
"""
_WITHDRAW = "DELETE FROM public.ssehub_instance_limits WHERE instance = $1"


async def _declare(pool: Any, instance: uuid.UUID, max_event_bytes: int) -> None:
    async with raw_connection(pool) as conn:
        await conn.execute(_DECLARE, instance, max_event_bytes, LAPSE_SECONDS)


async def keep_renewed(pool: Any, instance: uuid.UUID, max_event_bytes: int) -> None:
    """Renew forever; a failure (the database away) is logged and retried, never fatal."""
    while True:
        await asyncio.sleep(RENEW_SECONDS)
        try:
            async with asyncio.timeout(RENEW_SECONDS):
                await _declare(pool, instance, max_event_bytes)
        except Exception as exc:
            log.warning("could not renew this instance's event size limit: %s", exc)


async def declare(pool: Any, max_event_bytes: int) -> uuid.UUID:
    """This instance's limit counts for ``ssehub_enqueue`` from now on, while
    ``keep_renewed`` runs, until ``withdraw``; returns the instance's id."""
    instance = uuid.uuid4()
    await _declare(pool, instance, max_event_bytes)
    return instance


async def withdraw(pool: Any, instance: uuid.UUID) -> None:
    try:
        async with asyncio.timeout(RENEW_SECONDS), raw_connection(pool) as conn:
            await conn.execute(_WITHDRAW, instance)
    except Exception as exc:  # it lapses by itself
        log.warning("could not withdraw this instance's event size limit: %s", exc)
