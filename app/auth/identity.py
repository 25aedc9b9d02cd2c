"""Who is calling: one answer for every route, whatever credential was shown.

One verifier per kind of credential:

- ssehub's own JWTs (``app.auth.tokens``): access tokens, and stream tokens
  for the two stream endpoints (in the header, ``?access_token=`` or the
  ``ssehub_stream`` cookie, see ``app.auth.deps``);
- the application's identity provider's JWTs (``app.auth.external``), when
  ``SSEHUB_JWT_ISSUER`` is set, recognised by their ``iss``;
- API keys (``app.auth.api_keys``), recognised by their ``ssehub_`` prefix.

A route learns a ``Caller`` (a user, or an API key's grant) and never which
credential it was. ``Identity`` is also a ``ControlHandler`` (``app.notify``):
what its verifiers remember is forgotten when a control message hints that
it changed, and all of it after the listener reconnects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.auth.api_keys import ApiKeyGrant, ApiKeys, looks_like_key
from app.auth.external import ExternalTokens
from app.auth.tokens import Scope, decode_token
from app.config import Settings
from app.errors import Forbidden
from app.notify import Hints


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: int | None  # None: an API key
    api_key: ApiKeyGrant | None
    expires_at: float  # wall clock; a stream ends then
    scope: Scope = "access"

    def user(self) -> int:
        """The calling user's id; 403 for an API key, which may only publish and read history."""
        if self.user_id is None:
            raise Forbidden("API keys may only publish and read history")
        return self.user_id


class Identity:
    def __init__(self, settings: Settings, pool: Any) -> None:
        self._settings = settings
        self.api_keys = ApiKeys(pool)
        self.external = ExternalTokens(settings, pool) if settings.jwt_issuer else None

    async def caller(self, token: str, accept: frozenset[Scope]) -> Caller:
        """The caller a bearer credential names; 401 if it names none."""
        if looks_like_key(token):
            return Caller(None, await self.api_keys.grant(token), float("inf"))
        if self.external is not None and self.external.issued(token):
            user = await self.external.user(token)
            return Caller(user.user_id, None, user.expires_at)
        claims = decode_token(self._settings, token, accept)
        return Caller(claims.user_id, None, claims.expires_at, claims.scope)

    async def run(self) -> None:
        """Record API keys' use, until cancelled."""
        await self.api_keys.flush_forever()

    async def close(self) -> None:
        await self.api_keys.close()

    async def apply(self, conn: Any, hints: Hints) -> None:
        await self.api_keys.apply(conn, hints)
        if self.external is not None:
            await self.external.apply(conn, hints)
