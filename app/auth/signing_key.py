"""One signing key per database: an instance refuses to start beside one with another key.

Why: instances behind one load balancer must all sign and check tokens with
the same ``SSEHUB_SECRET_KEY``. One started with another key (a typo, a
forgotten ``.env``, a generated development key) answers the others' tokens
with 401, and they answer its tokens the same: a client's token then works or
fails at random, depending on which instance the balancer picks, and no log
line says why. So every instance (every process, whatever started it) keeps a
fingerprint of its key in ``signing_keys`` (migration 0004), refreshed every
``REFRESH_SECONDS`` while it runs, and refuses to start while a different
fingerprint was seen within ``FRESH_SECONDS``.

The fingerprint is HMAC-SHA256 of a fixed label, keyed with the key: one-way,
so the table holds nothing that signs a token or helps to guess the key.

A deliberate key change: stop every instance, change the key, and start
again once ``FRESH_SECONDS`` have passed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Any

from app.db import raw_connection

log = logging.getLogger("ssehub")

FINGERPRINT_LABEL = b"ssehub signing key fingerprint v1"
SIGNING_KEY_LOCK = 0x55E4F1  # pg advisory lock key: one start-up check at a time
FRESH_SECONDS = 15.0
REFRESH_SECONDS = 5.0

# The age in seconds of the freshest *other* fingerprint, if one is fresh.
_OTHER_KEY_AGE = """
SELECT extract(epoch FROM clock_timestamp() - last_seen_at)::float8 FROM public.signing_keys
WHERE fingerprint <> $1 AND last_seen_at > clock_timestamp() - make_interval(secs => $2)
ORDER BY last_seen_at DESC LIMIT 1
"""
_RECORD = """
INSERT INTO public.signing_keys (fingerprint, last_seen_at) VALUES ($1, clock_timestamp())
ON CONFLICT (fingerprint) DO UPDATE SET last_seen_at = EXCLUDED.last_seen_at
"""


class SigningKeyConflict(RuntimeError):
    """Another instance on this database signs tokens with a different key."""


def fingerprint(key: str) -> str:
    """A one-way fingerprint of ``key``: equal keys, equal fingerprints, nothing more."""
    return hmac.new(key.encode(), FINGERPRINT_LABEL, hashlib.sha256).hexdigest()


def conflict_message(age: float) -> str:
    return (
        "another instance signs tokens with a different SSEHUB_SECRET_KEY "
        f"(its key was seen {age:.0f} s ago), so each would answer the other's tokens "
        "with 401. Give every instance the same key; to change the key, stop them all "
        f"and start again after {FRESH_SECONDS:.0f} s"
    )


async def claim(conn: Any, fp: str) -> None:
    """Record ``fp`` as in use, or raise ``SigningKeyConflict`` if another is fresh.

    Under a transaction-scoped advisory lock: two instances starting together
    with different keys take turns, and the second sees the first's row.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SIGNING_KEY_LOCK)
        age = await conn.fetchval(_OTHER_KEY_AGE, fp, FRESH_SECONDS)
        if age is not None:
            raise SigningKeyConflict(conflict_message(age))
        await conn.execute(_RECORD, fp)


async def refresh(conn: Any, fp: str) -> float | None:
    """Mark ``fp`` as seen now; returns the age of a fresh other fingerprint, if any.

    There can be one only if it started while this instance could not refresh
    (the database away for longer than ``FRESH_SECONDS``).
    """
    await conn.execute(_RECORD, fp)
    age: float | None = await conn.fetchval(_OTHER_KEY_AGE, fp, FRESH_SECONDS)
    return age


async def keep_fresh(pool: Any, fp: str) -> None:
    """Refresh forever; a failure (the database away) is logged and retried, never fatal."""
    while True:
        await asyncio.sleep(REFRESH_SECONDS)
        try:
            async with asyncio.timeout(REFRESH_SECONDS), raw_connection(pool) as conn:
                age = await refresh(conn, fp)
        except Exception as exc:
            log.warning("could not refresh the signing key's fingerprint: %s", exc)
            continue
        if age is not None:
            log.error("%s", conflict_message(age))


async def claim_key(pool: Any, key: str) -> str:
    """Claim this process's key on ``pool``; its fingerprint, for ``keep_fresh``.
    Raises ``SigningKeyConflict`` while another key is in use."""
    fp = fingerprint(key)
    try:
        async with raw_connection(pool) as conn:
            await claim(conn, fp)
    except SigningKeyConflict as exc:
        log.error("%s", exc)  # a line of its own above the lifespan's traceback
        raise
    return fp
