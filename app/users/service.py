"""Users as an admin manages them. Services take a session and never commit.

Every change that narrows what a user may do is announced with a
``user_changed`` control message in the same transaction, so every instance
applies it within a second of the commit: a deleted user's streams end and its
tokens are refused; a demoted admin's streams drop the private channels it is
not a member of; cached rights are forgotten (``app.realtime.control``,
``app.events.rights``, ``app.auth.identity``).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.personal import personal_channel
from app.auth.service import get_user_by_name
from app.errors import NotFound
from app.models import Channel, ExternalTombstone, User
from app.notify import notify_control


async def get_user(session: AsyncSession, username: str) -> User:
    user = await get_user_by_name(session, username)
    if user is None:
        raise NotFound(f"User {username!r} not found")
    return user


async def list_users(session: AsyncSession, after: str | None, limit: int) -> list[User]:
    query = select(User).order_by(User.username).limit(limit)
    if after is not None:
        query = query.where(User.username > after)
    return list((await session.execute(query)).scalars())


async def set_admin(session: AsyncSession, user: User, is_admin: bool) -> None:
    if user.is_admin != is_admin:
        user.is_admin = is_admin
        await session.flush()
        await notify_control(session, "user_changed", user_id=user.id)


async def delete_user(session: AsyncSession, user: User) -> None:
    """The user goes with its memberships, subscriptions and personal channel
    (foreign keys cascade). An external user's tokens issued until now stay
    refused (``app.auth.external``)."""
    personal = (
        await session.execute(select(Channel.id).where(Channel.owner_id == user.id))
    ).scalar_one_or_none()
    if user.external_subject is not None:
        await session.execute(
            insert(ExternalTombstone)
            .values(subject=user.external_subject)
            .on_conflict_do_update(
                index_elements=["subject"],
                set_={"deleted_at": func.now()},
            )
        )
    await notify_control(session, "user_changed", user_id=user.id)
    if personal is not None:
        await notify_control(
            session, "channel_deleted", channel_id=personal, channel=personal_channel(user.username)
        )
    await session.delete(user)
    await session.flush()
