"""Channels, members and subscriptions. Services take a session and never commit.

Who may read a channel is ``app.channels.readable``: every query here that
answers for a caller uses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.schemas import USERNAME_PATTERN
from app.auth.service import get_user_by_name
from app.channels.readable import READABLE, readable_by
from app.channels.schemas import CHANNEL_NAME_PATTERN, ChannelIn, ChannelOut
from app.db import insert_unique
from app.errors import Forbidden, NotFound, Unauthorized
from app.models import Channel, ChannelMember, Event, PresenceLease, Subscription, User
from app.notify import notify_control

# Opening a stream, in bare SQL on the hot paths' pool: a reconnect storm opens
# thousands a second. One query checks that the user still exists and finds the
# channels. ``/stream`` carries the subscribed channels and the user's personal one.
_STREAM_ONE = f"""
SELECT u.is_admin, c.id, c.name FROM public.users u
LEFT JOIN public.channels c ON c.name = $2 AND {READABLE}
WHERE u.id = $1"""  # noqa: S608 - READABLE is a constant
_STREAM_SUBSCRIBED = f"""
SELECT u.is_admin, c.id, c.name FROM public.users u
LEFT JOIN public.channels c ON (c.owner_id = u.id OR c.id IN (
        SELECT s.channel_id FROM public.subscriptions s WHERE s.user_id = u.id))
    AND {READABLE}
WHERE u.id = $1"""  # noqa: S608 - READABLE is a constant
_CHANNEL_NAME = re.compile(CHANNEL_NAME_PATTERN)
_PERSONAL_NAME = re.compile("@" + USERNAME_PATTERN.lstrip("^"))


def lookup_name(name: str) -> str:
    """``name`` if a channel could have it (a channel's name, or ``@USERNAME``),
    else ``""``, which no channel has.

    Names come from URLs: one with a NUL byte, say, cannot even be sent to
    Postgres, but as ``""`` it is simply not found, by the same query.
    """
    return name if _CHANNEL_NAME.match(name) or _PERSONAL_NAME.match(name) else ""


@dataclass(frozen=True, slots=True)
class StreamAccess:
    is_admin: bool
    channels: dict[int, str]  # id -> name


async def stream_access(conn: Any, user_id: int, name: str | None) -> StreamAccess:
    """What a stream opened by ``user_id`` may carry: the channel ``name`` (404
    unless they can read it) or, with ``None``, their subscribed channels that
    they can still read. 401 if the user no longer exists."""
    if name is None:
        rows = await conn.fetch(_STREAM_SUBSCRIBED, user_id)
    else:
        rows = await conn.fetch(_STREAM_ONE, user_id, lookup_name(name))
    if not rows:
        raise Unauthorized("User no longer exists")
    channels = {row[1]: row[2] for row in rows if row[1] is not None}
    if name is not None and not channels:
        raise NotFound(f"Channel {name!r} not found")
    return StreamAccess(rows[0][0], channels)


# What open streams may carry now, for many users at once (a control message or
# a reconnected listener re-checks every affected stream): per user that still
# exists, the channels it can read among those its streams carry ($1, $2 as
# pairs) and those it is subscribed to (users $3, their personal channel
# included), each with whether ``/stream`` carries it. A user with no such
# channel still has one row (c.id NULL).
_STREAMS_ACCESS = f"""
WITH wanted AS (
    SELECT p.uid, p.cid FROM unnest($1::bigint[], $2::bigint[]) AS p(uid, cid)
    UNION
    SELECT s.user_id, s.channel_id FROM public.subscriptions s WHERE s.user_id = ANY($3::bigint[])
    UNION
    SELECT c.owner_id, c.id FROM public.channels c WHERE c.owner_id = ANY($3::bigint[])
)
SELECT u.id, u.is_admin, c.id, c.name,
       c.owner_id = u.id OR EXISTS (
           SELECT 1 FROM public.subscriptions s WHERE s.user_id = u.id AND s.channel_id = c.id)
FROM public.users u
LEFT JOIN wanted w ON w.uid = u.id
LEFT JOIN public.channels c ON c.id = w.cid AND {READABLE}
WHERE u.id = ANY($4::bigint[])"""  # noqa: S608 - READABLE is a constant


@dataclass(slots=True)
class UserAccess:
    is_admin: bool
    readable: dict[int, tuple[str, bool]]  # channel id -> (name, subscribed)


async def streams_access(
    conn: Any, carried: list[tuple[int, int]], subscribers: set[int]
) -> dict[int, UserAccess]:
    """Per user still existing: what its streams may carry now (``_STREAMS_ACCESS``).

    ``carried``: (user id, channel id) pairs the streams carry; ``subscribers``:
    users whose ``/stream`` follows their subscriptions. A user missing from the
    result no longer exists."""
    users = {uid for uid, _ in carried} | subscribers
    rows = await conn.fetch(
        _STREAMS_ACCESS,
        [uid for uid, _ in carried],
        [cid for _, cid in carried],
        list(subscribers),
        list(users),
    )
    access: dict[int, UserAccess] = {}
    for user_id, is_admin, channel_id, name, subscribed in rows:
        entry = access.setdefault(user_id, UserAccess(is_admin, {}))
        if channel_id is not None:
            entry.readable[channel_id] = (name, subscribed)
    return access


_HISTORY_ACCESS = f"""
SELECT (SELECT u.id FROM public.users u WHERE u.id = $2), c.id, {READABLE}
FROM public.channels c LEFT JOIN public.users u ON u.id = $2 WHERE c.name = $1"""  # noqa: S608 - READABLE is a constant


async def history_channel(conn: Any, name: str, user_id: int | None) -> int:
    """The id of the channel ``name`` whose history the caller may read: a user
    (``user_id``; 401 if gone, 404 unless they can read it) or, with ``None``, an
    API key whose patterns the caller checked already (404 only if missing)."""
    row = await conn.fetchrow(_HISTORY_ACCESS, lookup_name(name), user_id)
    if user_id is not None and row is not None and row[0] is None:
        raise Unauthorized("User no longer exists")
    if row is None or not (user_id is None or row[2]):
        raise NotFound(f"Channel {name!r} not found")
    return int(row[1])


async def get_channel(session: AsyncSession, name: str) -> Channel:
    """Any channel by name, for the admin's changes; 404 if missing. A personal
    channel is not changed this way: it lives and dies with its user (403)."""
    channel = (
        await session.execute(select(Channel).where(Channel.name == name))
    ).scalar_one_or_none()
    if channel is None:
        raise NotFound(f"Channel {name!r} not found")
    _not_personal(channel)
    return channel


def _not_personal(channel: Channel) -> None:
    if channel.owner_id is not None:
        raise Forbidden("A personal channel follows its user: it cannot be changed")


async def get_readable_channel(
    session: AsyncSession, user_id: int, is_admin: bool, name: str
) -> Channel:
    """The channel if the caller may read it, else the same 404 as a missing one."""
    query = select(Channel).where(Channel.name == name)
    if not is_admin:
        query = query.where(readable_by(user_id))
    channel = (await session.execute(query)).scalar_one_or_none()
    if channel is None:
        raise NotFound(f"Channel {name!r} not found")
    return channel


async def can_read(session: AsyncSession, user_id: int, is_admin: bool, channel_id: int) -> bool:
    query = select(Channel.id).where(Channel.id == channel_id)
    if not is_admin:
        query = query.where(readable_by(user_id))
    return (await session.execute(query)).first() is not None


async def list_readable(
    session: AsyncSession, user_id: int, is_admin: bool, after: str | None, limit: int
) -> list[Channel]:
    # Personal channels are not listed: each user has one (``GET /me/events``).
    query = select(Channel).where(Channel.owner_id.is_(None)).order_by(Channel.name).limit(limit)
    if after is not None:
        query = query.where(Channel.name > after)
    if not is_admin:
        query = query.where(readable_by(user_id))
    return list((await session.execute(query)).scalars())


async def last_event_ids(session: AsyncSession, channel_ids: list[int]) -> dict[int, int]:
    """Highest retained event id per channel (one index probe each)."""
    if not channel_ids:
        return {}
    rows = await session.execute(
        select(Event.channel_id, func.max(Event.id))
        .where(Event.channel_id.in_(channel_ids))
        .group_by(Event.channel_id)
    )
    return {cid: int(mx) for cid, mx in rows}


async def describe(session: AsyncSession, channels: list[Channel]) -> list[ChannelOut]:
    """Channel objects of the API, with ``last_event_id``."""
    last = await last_event_ids(session, [c.id for c in channels])
    return [
        ChannelOut(
            name=c.name,
            description=c.description,
            private=c.private,
            presence=c.presence,
            max_events=c.max_events,
            max_age_seconds=c.max_age_seconds,
            created_at=c.created_at,
            last_event_id=last.get(c.id),
        )
        for c in channels
    ]


async def create_channel(session: AsyncSession, body: ChannelIn) -> Channel:
    return await insert_unique(
        session, Channel(**body.model_dump()), f"Channel {body.name!r} exists"
    )


async def update_channel(session: AsyncSession, channel: Channel, changes: dict[str, Any]) -> None:
    """Apply a PATCH; a channel turning private re-checks every open stream's access."""
    became_private = changes.get("private") is True and not channel.private
    for field, value in changes.items():
        if field == "description" and value is None:
            value = ""
        if field in ("private", "presence") and value is None:
            continue
        setattr(channel, field, value)
    await session.flush()
    await session.refresh(channel)
    if not channel.presence:  # off: nobody is listed any more (app.realtime.presence)
        await session.execute(delete(PresenceLease).where(PresenceLease.channel_id == channel.id))
    if became_private:
        await notify_control(session, "access_changed", channel_id=channel.id, channel=channel.name)


async def delete_channel(session: AsyncSession, channel: Channel) -> None:
    """Events, members and subscriptions go with it (foreign keys cascade)."""
    await notify_control(session, "channel_deleted", channel_id=channel.id, channel=channel.name)
    await session.delete(channel)
    await session.flush()


async def _user(session: AsyncSession, username: str) -> User:
    user = await get_user_by_name(session, username)
    if user is None:
        raise NotFound(f"User {username!r} not found")
    return user


async def add_member(session: AsyncSession, channel: Channel, username: str) -> None:
    user = await _user(session, username)
    await session.execute(
        insert(ChannelMember)
        .values(channel_id=channel.id, user_id=user.id)
        .on_conflict_do_nothing()
    )


async def remove_member(session: AsyncSession, channel: Channel, username: str) -> None:
    user = await _user(session, username)
    result = await session.execute(
        delete(ChannelMember).where(
            ChannelMember.channel_id == channel.id, ChannelMember.user_id == user.id
        )
    )
    if result.rowcount:  # type: ignore[attr-defined]
        await notify_control(session, "access_changed", channel_id=channel.id, channel=channel.name)


async def list_members(session: AsyncSession, channel: Channel) -> list[tuple[str, Any]]:
    rows = await session.execute(
        select(User.username, ChannelMember.created_at)
        .join(ChannelMember, ChannelMember.user_id == User.id)
        .where(ChannelMember.channel_id == channel.id)
        .order_by(User.username)
    )
    return [(name, at) for name, at in rows]


async def subscriptions_of(session: AsyncSession, user_id: int) -> list[tuple[str, Any]]:
    rows = await session.execute(
        select(Channel.name, Subscription.created_at)
        .join(Subscription, Subscription.channel_id == Channel.id)
        .where(Subscription.user_id == user_id)
        .order_by(Channel.name)
    )
    return [(name, at) for name, at in rows]


async def subscribe(session: AsyncSession, user_id: int, channel: Channel) -> bool:
    """Store a subscription; returns whether it is new. Open streams learn of it.
    A personal channel needs none: ``/stream`` always carries it."""
    _not_personal(channel)
    result = await session.execute(
        insert(Subscription)
        .values(user_id=user_id, channel_id=channel.id)
        .on_conflict_do_nothing()
        .returning(Subscription.user_id)
    )
    created = result.first() is not None
    if created:
        await notify_control(
            session, "subscribed", user_id=user_id, channel_id=channel.id, channel=channel.name
        )
    return created


async def unsubscribe(session: AsyncSession, user_id: int, channel: Channel) -> None:
    result = await session.execute(
        delete(Subscription).where(
            Subscription.user_id == user_id, Subscription.channel_id == channel.id
        )
    )
    if result.rowcount:  # type: ignore[attr-defined]
        await notify_control(
            session, "unsubscribed", user_id=user_id, channel_id=channel.id, channel=channel.name
        )
