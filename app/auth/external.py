"""Your application's own tokens: JWTs from its identity provider (``SSEHUB_JWT_*``).

A token whose ``iss`` is ``SSEHUB_JWT_ISSUER`` is verified here instead of as
one of ssehub's own. The verifying key comes from one of:

- a JWKS URL (``app.auth.jwks``): fetched on first use, one fetch at a time,
  refreshed after five minutes and for an unknown ``kid`` at most every 30 s;
  a failure is remembered for 5 s (503 without a fetch), the last good key
  set keeps verifying while the provider fails, and no request waits more
  than 6 s for keys;
- one PEM public key (``SSEHUB_JWT_PUBLIC_KEY_FILE``), loaded by ``cryptography``;
- an HS256 secret shared with the issuer (``SSEHUB_JWT_SHARED_SECRET``).

**The key fixes the algorithm** (``algorithm_for``): an RSA key verifies only
RS256, a P-256 key only ES256, an Ed25519 key only EdDSA, the shared secret
only HS256. The token's own ``alg`` header chooses nothing, so an HS256 token
"signed" with an RSA public key as its secret, or ``alg: none``, is refused.
``iss``, ``aud`` (``SSEHUB_JWT_AUDIENCE``, required with an issuer: the
provider's other applications share its issuer) and ``exp`` are required;
``nbf`` and ``iat`` are honoured with ``LEEWAY_SECONDS`` of leeway.

**Users.** The user claim (``SSEHUB_JWT_USER_CLAIM``, default ``sub``) names
the user, who is created on first use with no password
(``users.external_subject``). A claim Postgres cannot store (a NUL, a lone
surrogate) or longer than ``MAX_SUBJECT_LENGTH`` names no user (401). The
username is ``username_for(claim)``: the characters a username cannot hold
become ``_``, and ``-`` plus 8 hex digits of the claim's SHA-256 follow, so
``auth0|123`` is ``auth0_123-`` + 8 hex digits and ``alice`` is ``alice-`` + 8
hex digits; distinct claims never share a name. **Registration refuses every
name of that form** (``reserved_for_external``), so nobody can take an
external user's name before their first token and lock them out; a name of
that form held by another account anyway (registered before the rule, or by
the operator) is refused to the subject (401) rather than shared. With
``SSEHUB_JWT_ADMIN_CLAIM`` set, the token says whether the user is an admin,
and the account follows it. An external user an admin deleted stays deleted
for the tokens issued before the deletion (``external_tombstones``): only a
token whose ``iat`` is more than ``LEEWAY_SECONDS`` after the deletion creates
them anew, since a provider whose clock runs ahead within the leeway stamps
a token issued before the deletion with a later ``iat``.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from app.auth.jwks import KeySet
from app.auth.personal import insert_personal_channels
from app.config import Settings
from app.db import raw_connection
from app.errors import Unauthorized
from app.notify import Hints, notify_control_raw
from app.text import storable

LEEWAY_SECONDS = 30
CACHE_SIZE = 10_000
MAX_SUBJECT_LENGTH = 255
_NOT_USERNAME = re.compile(r"[^A-Za-z0-9_.\-]")
# What username_for appends, and so what registration refuses (hex of either case:
# names are told apart by case, and a look-alike of another's name helps nobody).
_EXTERNAL_SUFFIX = re.compile(r"-[0-9a-fA-F]{8}\Z")

# The subject's user (NULLs if none) and when an admin last deleted it (NULL if never).
_FIND = """
SELECT u.id, u.is_admin, extract(epoch FROM t.deleted_at)
FROM (SELECT $1::text AS subject) s
LEFT JOIN public.users u ON u.external_subject = s.subject
LEFT JOIN public.external_tombstones t ON t.subject = s.subject"""
_CREATE = f"""
WITH u AS (
    INSERT INTO public.users (username, external_subject, is_admin) VALUES ($1, $2, $3)
    ON CONFLICT DO NOTHING RETURNING id, username
), c AS (
    {insert_personal_channels("u")}
)
SELECT id FROM u"""  # noqa: S608 - a constant
_SET_ADMIN = "UPDATE public.users SET is_admin = $2 WHERE id = $1"


def username_for(subject: str) -> str:
    """The username of the external user ``subject`` (see the module docstring):
    always with the suffix that registration refuses."""
    digest = hashlib.sha256(subject.encode()).hexdigest()[:8]
    return f"{_NOT_USERNAME.sub('_', subject)[:55]}-{digest}"


def reserved_for_external(username: str) -> bool:
    """Whether ``username`` has the form of ``username_for``'s names, which only
    the identity provider's users get: registration refuses it."""
    return _EXTERNAL_SUFFIX.search(username) is not None


def algorithm_for(key: Any) -> str:
    """The one algorithm a key verifies (no algorithm confusion)."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def _refuse_if_issued_before(claims: dict[str, Any], deleted_at: Any) -> None:
    """401 unless the token was issued (``iat``) more than the leeway after the
    subject's user was last deleted; a token without ``iat`` cannot show that it was."""
    if deleted_at is None:
        return
    issued_at = claims.get("iat")
    # The leeway on the safe side: a provider whose clock runs up to LEEWAY_SECONDS
    # ahead stamps a token issued just before the deletion with a later iat.
    if not (isinstance(issued_at, int | float) and issued_at > deleted_at + LEEWAY_SECONDS):
        raise Unauthorized("User no longer exists")


@dataclass(frozen=True, slots=True)
class ExternalUser:
    user_id: int
    expires_at: float


class ExternalTokens:
    """Verifies the identity provider's tokens and finds (or creates) their users."""

    def __init__(self, settings: Settings, pool: Any) -> None:
        assert settings.jwt_issuer
        self._settings = settings
        self._pool = pool
        self._jwks: KeySet | None = None
        self._static: tuple[Any, str] | None = None
        if settings.jwt_jwks_url:
            self._jwks = KeySet(settings.jwt_jwks_url)
        elif settings.jwt_public_key_file:
            key = load_pem_public_key(Path(settings.jwt_public_key_file).read_bytes())
            self._static = (key, algorithm_for(key))
        else:
            assert settings.jwt_shared_secret
            self._static = (settings.jwt_shared_secret, "HS256")
        self._verified: dict[str, ExternalUser] = {}

    def issued(self, token: str) -> bool:
        """Whether ``token`` claims to come from the configured issuer (unverified)."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return False
        return isinstance(claims, dict) and claims.get("iss") == self._settings.jwt_issuer

    async def user(self, token: str) -> ExternalUser:
        """The verified token's user; 401 for a bad token, 503 if the keys are unreachable."""
        known = self._verified.get(token)
        if known is not None and known.expires_at > time.time():
            return known
        claims = await self._verify(token)
        user = await self._user(claims)
        if len(self._verified) >= CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = user
        return user

    async def _verify(self, token: str) -> dict[str, Any]:
        key, algorithm = await self._key(token)
        settings = self._settings
        assert settings.jwt_audience  # required with an issuer (app.config)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                leeway=LEEWAY_SECONDS,
                options={"require": ["iss", "aud", "exp"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized("Invalid or expired token") from exc
        return claims

    async def _key(self, token: str) -> tuple[Any, str]:
        if self._static is not None:
            return self._static
        assert self._jwks is not None
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise Unauthorized("Invalid or expired token") from exc
        if not isinstance(kid, str):
            raise Unauthorized("Invalid or expired token")
        signing_key = await self._jwks.key(kid)
        try:
            return signing_key.key, algorithm_for(signing_key.key)
        except ValueError as exc:
            raise Unauthorized("Invalid or expired token") from exc

    async def _user(self, claims: dict[str, Any]) -> ExternalUser:
        """The user the claims name: found, or created on first use."""
        subject = self._subject(claims)
        admin = self._is_admin(claims)
        async with raw_connection(self._pool) as conn:
            row = await conn.fetchrow(_FIND, subject)
            # Also when the user exists: an account made anew by a later token must
            # not bring back the tokens issued before the deletion.
            _refuse_if_issued_before(claims, row[2])
            if row[0] is None:
                user_id = await self._create(conn, subject, bool(admin))
            else:
                user_id = int(row[0])
                if admin is not None and admin != row[1]:
                    await self._set_admin(conn, user_id, admin)
        return ExternalUser(user_id, float(claims["exp"]))

    def _subject(self, claims: dict[str, Any]) -> str:
        """The user claim as a subject Postgres can store and index; else 401.

        The provider signed it, but nothing bounds what it signs: a lone
        surrogate or a NUL cannot reach a query, and a subject kilobytes long
        outgrows the unique index's row; either would be a 500.
        """
        subject = claims.get(self._settings.jwt_user_claim)
        if isinstance(subject, int) and not isinstance(subject, bool):
            subject = str(subject)
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
            raise Unauthorized("The token names no user")
        try:
            return storable(subject)
        except ValueError as exc:
            raise Unauthorized("The token names no user") from exc

    def _is_admin(self, claims: dict[str, Any]) -> bool | None:
        """What the token says of admin rights, or None when no claim is configured."""
        claim = self._settings.jwt_admin_claim
        if not claim:
            return None
        value = claims.get(claim)
        wanted = self._settings.jwt_admin_value
        if isinstance(value, str):
            return wanted in value.split()
        return isinstance(value, list) and wanted in value

    async def _create(self, conn: Any, subject: str, admin: bool) -> int:
        user_id = await conn.fetchval(_CREATE, username_for(subject), subject, admin)
        if user_id is None:
            row = await conn.fetchrow(_FIND, subject)  # created meanwhile by another request
            if row[0] is None:
                raise Unauthorized(
                    f"The username {username_for(subject)!r} belongs to another account"
                )
            return int(row[0])
        return int(user_id)

    async def _set_admin(self, conn: Any, user_id: int, admin: bool) -> None:
        """Follow the token: instances forget what they knew of this user's rights."""
        async with conn.transaction():
            await conn.execute(_SET_ADMIN, user_id, admin)
            await notify_control_raw(conn, "user_changed", user_id=user_id)

    # -- kept true by the control messages ------------------------------------

    async def apply(self, _conn: Any, hints: Hints) -> None:
        if hints.everything or hints.users:
            self._verified.clear()  # rare: simpler than finding the user's tokens
