"""JWTs: HS256 only, with ``sub``, ``iat``, ``exp`` and a ``scope``.

An access token opens every endpoint; a stream token (``scope=stream``) opens
only the two stream endpoints, so a token that ends up in a URL or a browser
history cannot be used to publish or administer. A stream token never outlives
the token that obtained it (``issue_token``'s ``not_after``): a token about to
expire must not buy an hour more.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import jwt

from app.config import Settings
from app.errors import Unauthorized

ALGORITHM = "HS256"
Scope = Literal["access", "stream"]


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    scope: Scope
    expires_at: float


def issue_token(
    settings: Settings, user_id: int, scope: Scope, not_after: float = math.inf
) -> tuple[str, int]:
    """Sign a token for ``user_id`` that expires by ``not_after`` (wall clock) at
    the latest; returns it with its lifetime in seconds (0: already expired)."""
    ttl = (
        settings.access_token_ttl_seconds
        if scope == "access"
        else settings.stream_token_ttl_seconds
    )
    now = int(time.time())
    ttl = max(0, int(min(ttl, not_after - now)))  # whole seconds, rounded down
    claims = {"sub": str(user_id), "iat": now, "exp": now + ttl, "scope": scope}
    assert settings.secret_key, "ensure_secret_key() runs before the app is built"
    return jwt.encode(claims, settings.secret_key, algorithm=ALGORITHM), ttl


MAX_USER_ID = 2**63 - 1  # users.id is a bigint


def _user_id(sub: object) -> int | None:
    """``sub`` as a user id: a string of digits within bigint range, else None."""
    if not (isinstance(sub, str) and sub.isascii() and sub.isdigit()):
        return None
    user_id = int(sub)
    return user_id if user_id <= MAX_USER_ID else None


# Tokens already verified, so a client that sends the same token on every request
# (a publisher does) pays for the HMAC and the claim checks once: a seventh of a
# publish's CPU. Only good tokens are kept, with their expiry, which is checked
# on every use. Cleared whole when full: simple, and bounded.
_verified: dict[tuple[str, str], tuple[int, str, float]] = {}
VERIFIED_CACHE_SIZE = 10_000


def decode_token(settings: Settings, token: str, accept: frozenset[Scope]) -> TokenClaims:
    """Verify signature, algorithm, expiry and scope; anything wrong is a 401."""
    assert settings.secret_key
    key = (settings.secret_key, token)
    verified = _verified.get(key)
    if verified is None or verified[2] <= time.time():
        _verified.pop(key, None)
        verified = _verify(settings.secret_key, token)
        if len(_verified) >= VERIFIED_CACHE_SIZE:
            _verified.clear()
        _verified[key] = verified
    user_id, scope, expires_at = verified
    for allowed in accept:
        if scope == allowed:
            return TokenClaims(user_id=user_id, scope=allowed, expires_at=expires_at)
    raise Unauthorized(f"A {scope} token cannot be used here")


def _verify(secret_key: str, token: str) -> tuple[int, str, float]:
    """The user id, scope and expiry of a token with a good signature and claims."""
    try:
        claims = jwt.decode(
            token,
            secret_key,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "iat", "exp", "scope"]},
        )
    except jwt.PyJWTError as exc:
        raise Unauthorized("Invalid or expired token") from exc
    user_id = _user_id(claims["sub"])
    scope = claims["scope"]
    if user_id is None or not isinstance(scope, str):
        # Only a holder of the key can sign such claims; still a 401, not a 500
        # (an unhashable scope, or an id Postgres's bigint cannot hold).
        raise Unauthorized("Invalid or expired token")
    return user_id, scope, float(claims["exp"])
