"""``/auth/*`` and ``/users/me``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import OAuth2PasswordRequestForm

from app.auth import service
from app.auth.deps import CurrentUser, SettingsDep
from app.auth.schemas import RegisterIn, StreamTokenOut, TokenOut, UserOut
from app.auth.tokens import issue_token
from app.db import SessionDep
from app.errors import Forbidden
from app.models import User

router = APIRouter(tags=["auth"])


@router.post("/auth/register", status_code=201, response_model=UserOut)
async def register(body: RegisterIn, session: SessionDep, settings: SettingsDep) -> User:
    """Create an account (403 when registration is closed)."""
    if not settings.registration_open:
        raise Forbidden("Registration is closed")
    return await service.create_user(session, body.username, body.password)


@router.post("/auth/token", response_model=TokenOut)
async def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    settings: SettingsDep,
) -> TokenOut:
    """Exchange username and password for an access token (OAuth2 password flow)."""
    user = await service.authenticate(session, form.username, form.password)
    access_token, ttl = issue_token(settings, user.id, "access")
    return TokenOut(access_token=access_token, expires_in=ttl)


@router.post("/auth/stream-token", response_model=StreamTokenOut)
async def stream_token(user: CurrentUser, settings: SettingsDep) -> StreamTokenOut:
    """A token only the stream endpoints accept, safe(r) to put in an EventSource URL."""
    token_, ttl = issue_token(settings, user.id, "stream")
    return StreamTokenOut(stream_token=token_, expires_in=ttl)


@router.get("/users/me", response_model=UserOut)
async def me(user: CurrentUser) -> User:
    """The caller's account."""
    return user
