"""API keys for backend publishers: made, checked, revoked, their use recorded.

A key reads ``ssehub_<prefix>_<secret>``. The prefix is public and finds the
row; only the SHA-256 of the whole key is stored, and it is compared in
constant time (``hmac.compare_digest``). A fast hash is right here, unlike
for passwords: the secret is 256 random bits, so nothing can be guessed from
the hash, and every publish checks it.

A key may publish (single, batch, personal channels) and read history on the
channels its ``publish`` patterns match, in which ``*`` stands for any run of
characters; every other endpoint answers it 403. **A personal channel
(``@USERNAME``) is matched only by a pattern that begins with ``@``**: a key
for "every channel" (``*``) reaches no user's private channel; ``@*`` does.
**Patterns match in linear time** (``matches``), whatever their stars: a
pattern is an admin's input, and a regular expression made from it
backtracks for minutes, holding the event loop, on nine stars.

**Revocation within a second everywhere.** A checked key is remembered by
the process (so a publisher's every request costs no query), until the
``api_key_revoked`` control message, sent in the deleting transaction,
reaches the instance (within a second); a reconnected listener forgets every
key (``Hints.everything``), since such a message may have been lost. A
message is only a hint (anyone may send one): the key is forgotten, and its
next use is looked up again.

**last_used_at without a write per request.** Uses are noted in memory and
written every ``USAGE_FLUSH_SECONDS`` by one statement for all the keys used.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import raw_connection
from app.errors import NotFound, Unauthorized
from app.models import ApiKey
from app.notify import Hints, notify_control

log = logging.getLogger("ssehub")

KEY_PREFIX = "ssehub_"
USAGE_FLUSH_SECONDS = 5.0
CACHE_SIZE = 10_000
_KEY = re.compile(r"ssehub_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})")

_FIND = "SELECT id, secret_hash, publish FROM public.api_keys WHERE prefix = $1"
_RECORD_USE = """
UPDATE public.api_keys k SET last_used_at = greatest(k.last_used_at, u.at)
FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, at) WHERE k.id = u.id"""


@dataclass(frozen=True, slots=True)
class ApiKeyGrant:
    """What a checked key may do: publish to, and read, the channels its patterns match."""

    id: int
    patterns: tuple[str, ...]

    def allows(self, channel: str) -> bool:
        personal = channel.startswith("@")
        return any(p.startswith("@") == personal and matches(p, channel) for p in self.patterns)


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` is ``pattern`` with each ``*`` replaced by any run of
    characters (none included).

    Linear in ``len(name)`` (times the pattern's length at worst), never
    backtracking: the text before the first star must begin the name and the
    text after the last must end it; each piece between stars is then taken
    at its leftmost place after the one before. Leftmost is never wrong: if
    any placement of the pieces matches, moving a piece to an earlier place
    leaves at least as much name for the pieces after it, so the leftmost one
    matches too. Each ``str.find`` starts where the last piece ended, so the
    name is scanned once.
    """
    first, *middle_and_last = pattern.split("*")
    if not middle_and_last:
        return name == pattern
    *middle, last = middle_and_last
    if len(name) < len(first) + len(last) or not (name.startswith(first) and name.endswith(last)):
        return False
    position, end = len(first), len(name) - len(last)
    for piece in middle:
        found = name.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


def new_key() -> tuple[str, str, bytes]:
    """A new key, its public prefix and the hash to store."""
    prefix = "".join(secrets.choice("abcdefghijkmnopqrstuvwxyz23456789") for _ in range(12))
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, _digest(key)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


async def create_key(session: AsyncSession, name: str, patterns: list[str]) -> tuple[ApiKey, str]:
    """Store a new key's hash; returns the row and the key, which exists nowhere else."""
    key, prefix, secret_hash = new_key()
    row = ApiKey(name=name, publish=patterns, prefix=prefix, secret_hash=secret_hash)
    session.add(row)
    await session.flush()
    await session.refresh(row)
    return row, key


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    return list((await session.execute(select(ApiKey).order_by(ApiKey.id))).scalars())


async def delete_key(session: AsyncSession, key_id: int) -> None:
    """Delete the key; every instance refuses it once the transaction commits."""
    result = await session.execute(delete(ApiKey).where(ApiKey.id == key_id))
    if not result.rowcount:  # type: ignore[attr-defined]
        raise NotFound(f"API key {key_id} not found")
    await notify_control(session, "api_key_revoked", key_id=key_id)


class ApiKeys:
    """Checks keys for the identity layer; a ``ControlHandler`` for revocations."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._checked: dict[str, ApiKeyGrant] = {}
        self._used: dict[int, float] = {}
        self._revocations = 0  # a look-up that a revocation overtook is not remembered

    async def grant(self, key: str) -> ApiKeyGrant:
        """The key's grant; 401 for a malformed, unknown or revoked key."""
        grant = self._checked.get(key)
        if grant is None:
            revocations = self._revocations
            grant = await self._look_up(key)
            if revocations != self._revocations:
                grant = await self._look_up(key)  # it may be the key just revoked
            if len(self._checked) >= CACHE_SIZE:
                self._checked.clear()
            self._checked[key] = grant
        self._used[grant.id] = time.time()
        return grant

    async def _look_up(self, key: str) -> ApiKeyGrant:
        match = _KEY.fullmatch(key)
        if match is None:
            raise Unauthorized("Invalid API key")
        async with raw_connection(self._pool) as conn:
            row = await conn.fetchrow(_FIND, match[1])
        if row is None or not hmac.compare_digest(bytes(row[1]), _digest(key)):
            raise Unauthorized("Invalid API key")
        return ApiKeyGrant(int(row[0]), tuple(row[2]))

    # -- kept true by the control messages ------------------------------------

    async def apply(self, _conn: Any, hints: Hints) -> None:
        if hints.everything:
            self._revocations += 1
            self._checked.clear()
        elif hints.api_keys:
            self._revocations += 1
            for key, grant in list(self._checked.items()):
                if grant.id in hints.api_keys:
                    del self._checked[key]

    # -- last_used_at ---------------------------------------------------------

    async def close(self) -> None:
        """The last flush, once ``flush_forever`` has stopped."""
        with contextlib.suppress(Exception):
            await self.flush()

    async def flush(self) -> None:
        """Write the keys used since the last flush, in one statement."""
        used, self._used = self._used, {}
        if not used:
            return
        at = [datetime.fromtimestamp(t, UTC) for t in used.values()]
        try:
            async with raw_connection(self._pool) as conn:
                await conn.execute(_RECORD_USE, list(used), at)
        except Exception:
            for key_id, t in used.items():  # keep them for the next flush
                self._used[key_id] = max(t, self._used.get(key_id, 0.0))
            raise

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(USAGE_FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception as exc:
                log.warning("api keys: recording their use failed (%s); retrying", exc)
