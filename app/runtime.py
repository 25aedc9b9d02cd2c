"""The runtime: every shared part of a running instance, typed, in one object.

Built once per process by ``app.lifespan.running``, in dependency order, each
part given its collaborators in its constructor; the app's state holds
this object and nothing else. Routes and dependencies reach it through one
accessor, ``runtime(request)`` (``RuntimeDep`` for FastAPI's dependencies),
so that the hot paths read one attribute, and every part's type is known.

The parts' types are imported only for type checking, so that any module
(``app.db`` included) may import this one without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, cast

from fastapi import Depends
from starlette.requests import Request

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

    from app.auth.identity import Identity
    from app.auth.throttle import LoginThrottle
    from app.config import Settings
    from app.events.publisher import Publisher
    from app.events.rights import PublishRights
    from app.metrics import Metrics
    from app.realtime.access import StreamAccessCache
    from app.realtime.broker import Broker
    from app.realtime.hub import Hub
    from app.realtime.listener import Listener
    from app.realtime.presence import Presence
    from app.realtime.replay import SharedPages


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    metrics: Metrics
    engine: AsyncEngine  # the ORM's, for the REST endpoints
    sessionmaker: async_sessionmaker[AsyncSession]
    pool: Any  # the hot paths' asyncpg pool (``app.db.raw_connection``)
    login_throttle: LoginThrottle
    identity: Identity  # who is calling: one verifier per credential
    publish_rights: PublishRights
    publisher: Publisher  # the writer
    broker: Broker
    hub: Hub
    listener: Listener
    replays: SharedPages
    stream_access: StreamAccessCache
    presence: Presence  # who is online in the presence channels, as leases


def runtime(request: Request) -> Runtime:
    """The running instance's parts (set by the lifespan before any request)."""
    return cast(Runtime, request.app.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(runtime)]
