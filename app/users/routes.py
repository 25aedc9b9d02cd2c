"""``/users`` (admin): list, promote or demote, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict

from app.auth.deps import AdminUser
from app.auth.schemas import UserOut
from app.db import SessionDep
from app.models import User
from app.text import Text
from app.users import service

router = APIRouter(tags=["users"])
Username = Annotated[Text, Path()]


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    is_admin: bool


@router.get("/users", response_model=list[UserOut])
async def list_users(
    session: SessionDep,
    _: AdminUser,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[Text | None, Query(max_length=64)] = None,
) -> list[User]:
    """Users in name order (admin); page with ``after``."""
    return await service.list_users(session, after, limit)


@router.patch("/users/{username}", response_model=UserOut)
async def patch_user(
    username: Username, body: UserPatch, session: SessionDep, _: AdminUser
) -> User:
    """Promote or demote (admin). A demoted admin's open streams stop carrying the
    private channels it is not a member of, on every instance, within a second."""
    user = await service.get_user(session, username)
    await service.set_admin(session, user, body.is_admin)
    return user


@router.delete("/users/{username}", status_code=204)
async def delete_user(username: Username, session: SessionDep, _: AdminUser) -> Response:
    """Delete a user with its personal channel (admin): its open streams end on
    every instance within a second, and its tokens are refused from then on."""
    await service.delete_user(session, await service.get_user(session, username))
    return Response(status_code=204)
