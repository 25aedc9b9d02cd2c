"""The caller dependencies: ``AccessClaims``, ``CurrentUser``, ``AdminUser``, ``StreamClaims``.

REST endpoints accept only access tokens, from the ``Authorization`` header.
``AccessClaims`` is the token alone, for the publish routes: the publish
function checks in its own transaction that the user exists and is an admin.
The stream endpoints also accept stream tokens, and a token in the
``access_token`` query parameter, because ``EventSource`` cannot set headers.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer

from app.auth.service import get_user
from app.auth.tokens import Scope, TokenClaims, decode_token
from app.config import Settings
from app.db import SessionDep
from app.errors import Forbidden, Unauthorized
from app.models import User

bearer_scheme = OAuth2PasswordBearer(tokenUrl="/auth/token", auto_error=False)
ACCESS_ONLY: frozenset[Scope] = frozenset({"access"})
ACCESS_OR_STREAM: frozenset[Scope] = frozenset({"access", "stream"})


async def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(settings_of)]


async def access_claims(
    settings: SettingsDep, token: Annotated[str | None, Depends(bearer_scheme)]
) -> TokenClaims:
    """The caller's access token, checked without the database (401 if bad)."""
    if not token:
        raise Unauthorized()
    return decode_token(settings, token, ACCESS_ONLY)


AccessClaims = Annotated[TokenClaims, Depends(access_claims)]


async def current_user(session: SessionDep, claims: AccessClaims) -> User:
    user = await get_user(session, claims.user_id)
    if user is None:
        raise Unauthorized("User no longer exists")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def admin_user(user: CurrentUser) -> User:
    if not user.is_admin:
        raise Forbidden("Admin only")
    return user


AdminUser = Annotated[User, Depends(admin_user)]


def stream_claims(request: Request) -> TokenClaims:
    """A stream's token from the header or ``?access_token=`` (header first).

    Checked without the database: the stream's own lookup
    (``app.channels.service.stream_access``) checks that the user still exists,
    in the same query that finds its channels.
    """
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not (scheme.lower() == "bearer" and token):
        token = request.query_params.get("access_token", "")
    if not token:
        raise Unauthorized()
    return decode_token(request.app.state.settings, token.strip(), ACCESS_OR_STREAM)


StreamClaims = Annotated[TokenClaims, Depends(stream_claims)]
