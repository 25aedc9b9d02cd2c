"""The caller dependencies: every route asks one of these who is calling.

- ``PublisherCaller``: publishing and history, which also accept API keys.
- ``CurrentUser`` / ``AdminUser``: every other REST endpoint; a user (ssehub's
  own access token or the identity provider's), never an API key (403).
- ``stream_caller``: the two stream endpoints, which also accept stream
  tokens, in the ``Authorization`` header, in ``?access_token=`` (for
  ``EventSource``, which cannot set headers) or in the ``ssehub_stream`` cookie
  (``POST /auth/stream-cookie``), in that order; never an API key.

The security schemes below are what ``/docs`` shows; the credentials are all
checked by ``app.auth.identity``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, APIKeyQuery, HTTPBearer, OAuth2PasswordBearer

from app.auth.identity import Caller, Identity
from app.auth.service import get_user
from app.auth.tokens import Scope
from app.config import Settings
from app.db import SessionDep
from app.errors import Forbidden, Unauthorized
from app.models import User
from app.runtime import runtime

STREAM_COOKIE = "ssehub_stream"
bearer_scheme = OAuth2PasswordBearer(
    tokenUrl="/auth/token",
    auto_error=False,
    description="An access token from /auth/token, or a JWT from your identity provider "
    "(SSEHUB_JWT_ISSUER).",
)
api_key_scheme = HTTPBearer(
    scheme_name="APIKey",
    bearerFormat="ssehub_…",
    auto_error=False,
    description="An API key (POST /api-keys): publishing and history only.",
)
stream_query_scheme = APIKeyQuery(
    name="access_token",
    scheme_name="StreamTokenQuery",
    auto_error=False,
    description="A stream token (or access token) in the URL, for EventSource.",
)
stream_cookie_scheme = APIKeyCookie(
    name=STREAM_COOKIE,
    scheme_name="StreamCookie",
    auto_error=False,
    description="The cookie POST /auth/stream-cookie sets: streams only.",
)
ACCESS_ONLY: frozenset[Scope] = frozenset({"access"})
ACCESS_OR_STREAM: frozenset[Scope] = frozenset({"access", "stream"})


async def settings_of(request: Request) -> Settings:
    return runtime(request).settings


SettingsDep = Annotated[Settings, Depends(settings_of)]


def _identity(request: Request) -> Identity:
    return runtime(request).identity


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def publisher_caller(request: Request) -> Caller:
    """The caller of a publish or a history read: a user or an API key (401 if none)."""
    token = _bearer(request)
    if not token:
        raise Unauthorized()
    return await _identity(request).caller(token, ACCESS_ONLY)


async def _publisher_caller(
    request: Request,
    _token: Annotated[str | None, Depends(bearer_scheme)],
    _key: Annotated[object, Depends(api_key_scheme)],
) -> Caller:
    return await publisher_caller(request)


PublisherCaller = Annotated[Caller, Depends(_publisher_caller)]


async def _user_caller(
    request: Request, _token: Annotated[str | None, Depends(bearer_scheme)]
) -> Caller:
    caller = await publisher_caller(request)
    caller.user()  # 403 for an API key
    return caller


UserCaller = Annotated[Caller, Depends(_user_caller)]


async def current_user(session: SessionDep, caller: UserCaller) -> User:
    user = await get_user(session, caller.user())
    if user is None:
        raise Unauthorized("User no longer exists")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def admin_user(user: CurrentUser) -> User:
    if not user.is_admin:
        raise Forbidden("Admin only")
    return user


AdminUser = Annotated[User, Depends(admin_user)]


async def stream_caller(request: Request) -> Caller:
    """A stream's caller from the header, ``?access_token=`` or the cookie (in that
    order). Checked without the database: the stream's own lookup
    (``app.channels.service.stream_access``) checks that the user still exists,
    in the same query that finds its channels."""
    token = (
        _bearer(request)
        or request.query_params.get("access_token", "").strip()
        or request.cookies.get(STREAM_COOKIE, "")
    )
    if not token:
        raise Unauthorized()
    caller = await _identity(request).caller(token, ACCESS_OR_STREAM)
    caller.user()  # 403 for an API key
    return caller


async def _stream_caller(
    request: Request,
    _token: Annotated[str | None, Depends(bearer_scheme)],
    _query: Annotated[str | None, Depends(stream_query_scheme)],
    _cookie: Annotated[str | None, Depends(stream_cookie_scheme)],
) -> Caller:
    return await stream_caller(request)


StreamCaller = Annotated[Caller, Depends(_stream_caller)]
