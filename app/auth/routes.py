"""``/auth/*`` and ``/users/me``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import OAuth2PasswordRequestForm

from app.auth import service
from app.auth.deps import STREAM_COOKIE, CurrentUser, SettingsDep, UserCaller
from app.auth.passwords import hash_password
from app.auth.schemas import RegisterIn, StreamTokenOut, TokenOut, UserOut
from app.auth.throttle import LoginThrottle, client_address
from app.auth.tokens import issue_token
from app.db import SessionDep
from app.errors import Conflict, Forbidden, Unauthorized
from app.models import User
from app.runtime import runtime

router = APIRouter(tags=["auth"])


def _throttle(request: Request) -> LoginThrottle:
    throttle = runtime(request).login_throttle
    return throttle


@router.post("/auth/register", status_code=201, response_model=UserOut)
async def register(
    body: RegisterIn, request: Request, session: SessionDep, settings: SettingsDep
) -> User:
    """Create an account (403 when registration is closed)."""
    if not settings.registration_open:
        raise Forbidden("Registration is closed")
    throttle, address = _throttle(request), client_address(request)
    throttle.check(address, body.username)
    with throttle.slot():
        password_hash = await throttle.run(hash_password, body.password)
        try:
            return await service.create_user(session, body.username, password_hash)
        except Conflict:
            throttle.failed(address, body.username)
            raise


@router.post("/auth/token", response_model=TokenOut)
async def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    request: Request,
    settings: SettingsDep,
) -> TokenOut:
    """Exchange username and password for an access token (OAuth2 password flow)."""
    throttle, address = _throttle(request), client_address(request)
    throttle.check(address, form.username)
    with throttle.slot():
        try:
            user_id = await service.authenticate(
                runtime(request).pool, throttle, form.username, form.password
            )
        except Unauthorized:
            throttle.failed(address, form.username)
            raise
    access_token, ttl = issue_token(settings, user_id, "access")
    return TokenOut(access_token=access_token, expires_in=ttl)


@router.post("/auth/stream-token", response_model=StreamTokenOut)
async def stream_token(
    user: CurrentUser, caller: UserCaller, settings: SettingsDep
) -> StreamTokenOut:
    """A token only the stream endpoints accept, safe(r) to put in an EventSource
    URL; it expires with the token that asked for it, if that is sooner."""
    token_, ttl = issue_token(settings, user.id, "stream", not_after=caller.expires_at)
    return StreamTokenOut(stream_token=token_, expires_in=ttl)


@router.post("/auth/stream-cookie", status_code=204)
async def stream_cookie(user: CurrentUser, caller: UserCaller, settings: SettingsDep) -> Response:
    """Set the ``ssehub_stream`` cookie (HttpOnly) holding a stream token: both
    stream endpoints accept it, so a page needs no token in any URL. REST
    endpoints never accept it. It expires with the token that asked for it, if
    that is sooner."""
    token_, ttl = issue_token(settings, user.id, "stream", not_after=caller.expires_at)
    response = Response(status_code=204)
    response.set_cookie(
        STREAM_COOKIE,
        token_,
        max_age=ttl,
        path="/",
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
    )
    return response


@router.delete("/auth/stream-cookie", status_code=204)
async def clear_stream_cookie(settings: SettingsDep) -> Response:
    """Clear the ``ssehub_stream`` cookie."""
    response = Response(status_code=204)
    response.delete_cookie(
        STREAM_COOKIE, path="/", httponly=True, samesite="lax", secure=settings.cookie_secure
    )
    return response


@router.get("/users/me", response_model=UserOut)
async def me(user: CurrentUser) -> User:
    """The caller's account."""
    return user
