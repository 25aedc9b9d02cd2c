"""JWTs: HS256 only, with ``sub``, ``iat``, ``exp`` and a ``scope``.

An access token opens every endpoint; a stream token (``scope=stream``) opens
only the two stream endpoints, so a token that ends up in a URL or a browser
history cannot be used to publish or administer.
"""

from __future__ import annotations

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


def issue_token(settings: Settings, user_id: int, scope: Scope) -> tuple[str, int]:
    """Sign a token for ``user_id``; returns it with its lifetime in seconds."""
    ttl = (
        settings.access_token_ttl_seconds
        if scope == "access"
        else settings.stream_token_ttl_seconds
    )
    now = int(time.time())
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


def decode_token(settings: Settings, token: str, accept: frozenset[Scope]) -> TokenClaims:
    """Verify signature, algorithm, expiry and scope; anything wrong is a 401."""
    assert settings.secret_key
    try:
        claims = jwt.decode(
            token,
            settings.secret_key,
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
    for allowed in accept:
        if scope == allowed:
            return TokenClaims(user_id=user_id, scope=allowed, expires_at=float(claims["exp"]))
    raise Unauthorized(f"A {scope} token cannot be used here")
