"""``/channels``, ``/channels/{name}/members`` and ``/me/subscriptions``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from app.auth.deps import AdminUser, CurrentUser
from app.channels import service
from app.channels.schemas import (
    ChannelIn,
    ChannelOut,
    ChannelPatch,
    MemberOut,
    PresenceOut,
    SubscriptionOut,
)
from app.db import SessionDep, raw_connection
from app.errors import Conflict
from app.realtime.presence import listing, read_lists
from app.runtime import RuntimeDep
from app.text import Text

router = APIRouter(tags=["channels"])
Limit = Annotated[int, Query(ge=1, le=1000)]
# Path and query texts reach SQL: ``Text`` refuses what Postgres cannot store.
ChannelName = Annotated[Text, Path()]
Username = Annotated[Text, Path()]


@router.post("/channels", status_code=201, response_model=ChannelOut)
async def create_channel(body: ChannelIn, session: SessionDep, _: AdminUser) -> ChannelOut:
    """Create a channel (admin)."""
    channel = await service.create_channel(session, body)
    return (await service.describe(session, [channel]))[0]


@router.get("/channels", response_model=list[ChannelOut])
async def list_channels(
    session: SessionDep,
    user: CurrentUser,
    limit: Limit = 100,
    after: Annotated[Text | None, Query(max_length=64)] = None,
) -> list[ChannelOut]:
    """The channels the caller can read, in name order; page with ``after``."""
    channels = await service.list_readable(session, user.id, user.is_admin, after, limit)
    return await service.describe(session, channels)


@router.get("/channels/{name}", response_model=ChannelOut)
async def get_channel(name: ChannelName, session: SessionDep, user: CurrentUser) -> ChannelOut:
    """One channel the caller can read."""
    channel = await service.get_readable_channel(session, user.id, user.is_admin, name)
    return (await service.describe(session, [channel]))[0]


@router.patch("/channels/{name}", response_model=ChannelOut)
async def patch_channel(
    name: ChannelName, body: ChannelPatch, session: SessionDep, _: AdminUser
) -> ChannelOut:
    """Change description, privacy or history bounds (admin)."""
    channel = await service.get_channel(session, name)
    await service.update_channel(session, channel, body.model_dump(exclude_unset=True))
    return (await service.describe(session, [channel]))[0]


@router.delete("/channels/{name}", status_code=204)
async def delete_channel(name: ChannelName, session: SessionDep, _: AdminUser) -> Response:
    """Delete a channel with its events, members and subscriptions (admin)."""
    await service.delete_channel(session, await service.get_channel(session, name))
    return Response(status_code=204)


@router.get("/channels/{name}/presence", response_model=PresenceOut)
async def get_presence(
    name: ChannelName, parts: RuntimeDep, session: SessionDep, user: CurrentUser
) -> PresenceOut:
    """Who has a stream carrying the channel, on every instance (409 if presence is off)."""
    channel = await service.get_readable_channel(session, user.id, user.is_admin, name)
    if not channel.presence:
        raise Conflict(f"Presence is off for channel {name!r}")
    async with raw_connection(parts.pool) as conn:
        lists = await read_lists(conn, [channel.id], parts.settings.presence_ttl_seconds)
    return PresenceOut.model_validate(listing(channel.name, lists[channel.id].values()))


@router.get("/channels/{name}/members", response_model=list[MemberOut])
async def list_members(name: ChannelName, session: SessionDep, _: AdminUser) -> list[MemberOut]:
    """Members of a channel (admin)."""
    channel = await service.get_channel(session, name)
    rows = await service.list_members(session, channel)
    return [MemberOut(username=u, created_at=at) for u, at in rows]


@router.put("/channels/{name}/members/{username}", status_code=204)
async def add_member(
    name: ChannelName, username: Username, session: SessionDep, _: AdminUser
) -> Response:
    """Let a user read a private channel (admin)."""
    await service.add_member(session, await service.get_channel(session, name), username)
    return Response(status_code=204)


@router.delete("/channels/{name}/members/{username}", status_code=204)
async def remove_member(
    name: ChannelName, username: Username, session: SessionDep, _: AdminUser
) -> Response:
    """Revoke a member; its open streams stop carrying the channel (admin)."""
    await service.remove_member(session, await service.get_channel(session, name), username)
    return Response(status_code=204)


@router.get("/me/subscriptions", response_model=list[SubscriptionOut])
async def my_subscriptions(session: SessionDep, user: CurrentUser) -> list[SubscriptionOut]:
    """The caller's stored subscriptions."""
    rows = await service.subscriptions_of(session, user.id)
    return [SubscriptionOut(channel=c, created_at=at) for c, at in rows]


@router.put(
    "/me/subscriptions/{name}",
    response_model=SubscriptionOut,
    responses={201: {"model": SubscriptionOut, "description": "Subscribed (it is new)"}},
)
async def subscribe(
    name: ChannelName, session: SessionDep, user: CurrentUser, response: Response
) -> SubscriptionOut:
    """Subscribe: 201 when new, 200 when already there."""
    channel = await service.get_readable_channel(session, user.id, user.is_admin, name)
    created = await service.subscribe(session, user.id, channel)
    response.status_code = 201 if created else 200
    rows = await service.subscriptions_of(session, user.id)
    return next(SubscriptionOut(channel=c, created_at=at) for c, at in rows if c == name)


@router.delete("/me/subscriptions/{name}", status_code=204)
async def unsubscribe(name: ChannelName, session: SessionDep, user: CurrentUser) -> Response:
    """Unsubscribe (204 also when there was no subscription)."""
    channel = await service.get_readable_channel(session, user.id, user.is_admin, name)
    await service.unsubscribe(session, user.id, channel)
    return Response(status_code=204)
