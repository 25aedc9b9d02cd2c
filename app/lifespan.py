"""The one lifespan: build the runtime (``app.runtime``) in dependency order, run
its background loops in one task group, and stop them in the order shutdown needs.

Built in this order, each part given what it uses in its constructor: the
ORM's engine and the hot paths' pool; the signing key's claim
(``app.auth.signing_key``: refuse to start beside another key); the login
throttle and the identity verifiers; the broker (``SSEHUB_BROKER``, chosen
here once); the writer, which tells the broker what it committed; the
publish rights; this instance's say in ``ssehub_enqueue``'s size limit; the
hub, which tells the broker what it carries; the broker started with the
hub as its sink; presence, which counts the hub's streams; the listener,
which applies control hints to the open streams, the opening streams'
access cache, the publish rights, the identity verifiers and presence, and
drives the broker's log tail, if it has one.

**Shutdown.** On SIGTERM or SIGINT every stream is closed at once
(``streams_closed_on_signal``): uvicorn waits for open responses, which
for streams would be forever. Then, in order: the hub's ticker, presence
(its leases then lapse after the grace: ``Presence.retire``), the
listener and the broker (nothing live is delivered any more), the writer
(it finishes the publishes it holds), the other loops, and last the pool
and the engine, which all of them used.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from types import FrameType
from typing import Any

from app.auth import signing_key
from app.auth.identity import Identity
from app.auth.throttle import LoginThrottle
from app.config import Settings
from app.db import create_engine, create_pool, create_sessionmaker, split_budget
from app.events import enqueue_limit, retention
from app.events.publisher import Publisher
from app.events.rights import PublishRights
from app.metrics import Metrics
from app.realtime.access import StreamAccessCache
from app.realtime.broker import Broker, PostgresBroker
from app.realtime.control import StreamControl
from app.realtime.hub import Hub
from app.realtime.listener import Listener
from app.realtime.presence import Presence
from app.realtime.replay import SharedPages
from app.runtime import Runtime

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Loops:
    """The runtime's background loops, each a task of one ``TaskGroup``: the
    lifespan stops them by name, in its order, and the group then ends with
    none left running."""

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def run(self, name: str, loop: Coroutine[Any, Any, None]) -> None:
        self._tasks[name] = self._group.create_task(loop, name=name)

    async def finish(self, name: str) -> None:
        """Wait for a loop that returns by itself (the writer, once closed)."""
        await asyncio.wait([self._tasks.pop(name)])

    async def stop(self, *names: str) -> None:
        """Cancel these loops, one after the other, each waited for; all that
        are left when no name is given."""
        for name in names or list(self._tasks):
            task = self._tasks.pop(name)
            task.cancel()
            await asyncio.wait([task])


@asynccontextmanager
async def running(settings: Settings, metrics: Metrics) -> AsyncIterator[Runtime]:
    """The runtime, built and running until the block ends."""
    assert settings.database_url and settings.secret_key, "create_app resolves them"
    orm_size, raw_size = split_budget(settings.db_pool_size)
    pgbouncer = settings.behind_pgbouncer
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.database_url, orm_size, pgbouncer)
        stack.push_async_callback(engine.dispose)
        pool = await create_pool(settings.database_url, raw_size, pgbouncer)
        stack.push_async_callback(pool.close)
        fingerprint = await signing_key.claim_key(pool, settings.secret_key)
        throttle = LoginThrottle(settings.login_attempts_per_minute)
        stack.callback(throttle.close)
        identity = Identity(settings, pool)
        stack.push_async_callback(identity.close)
        broker = _broker(settings, pool, metrics)
        publisher = Publisher(settings.database_url, metrics, broker.committed, pgbouncer)
        publish_rights = PublishRights(pool)
        instance = await enqueue_limit.declare(pool, settings.max_event_bytes)
        stack.push_async_callback(enqueue_limit.withdraw, pool, instance)
        hub = Hub(metrics, broker, settings.max_streams_per_user, settings.send_timeout_seconds)
        stream_access = StreamAccessCache()
        await broker.start(hub)
        stack.push_async_callback(broker.stop)
        presence = Presence(
            pool, hub, metrics, settings.presence_grace_seconds, settings.presence_ttl_seconds
        )
        listener = Listener(
            settings.listen_database_url or settings.database_url,
            broker.log_tail(),
            [StreamControl(hub, stream_access), publish_rights, identity, presence],
            publisher.inbox_due,
        )
        runtime = Runtime(
            settings=settings,
            metrics=metrics,
            engine=engine,
            sessionmaker=create_sessionmaker(engine),
            pool=pool,
            login_throttle=throttle,
            identity=identity,
            publish_rights=publish_rights,
            publisher=publisher,
            broker=broker,
            hub=hub,
            listener=listener,
            replays=SharedPages(pool, hub),
            stream_access=stream_access,
            presence=presence,
        )
        async with asyncio.TaskGroup() as group:
            loops = Loops(group)
            loops.run("signing-key", signing_key.keep_fresh(pool, fingerprint))
            loops.run("api-key-usage", identity.run())
            loops.run("writer", publisher.run())
            loops.run("retention", retention.run(pool, settings.retention_interval_seconds))
            limit = enqueue_limit.keep_renewed(pool, instance, settings.max_event_bytes)
            loops.run("enqueue-limit", limit)
            loops.run("broker", broker.run())
            loops.run("listener", listener.run())
            loops.run("hub-ticker", hub.tick_forever(settings.heartbeat_seconds))
            loops.run("presence", runtime.presence.run())
            try:
                with streams_closed_on_signal(hub):
                    yield runtime
            finally:
                hub.close_all("shutdown")
                await loops.stop("hub-ticker", "presence")
                await runtime.presence.retire()
                await loops.stop("listener", "broker")
                publisher.close()
                await loops.finish("writer")
                await loops.stop()


def _broker(settings: Settings, pool: Any, metrics: Metrics) -> Broker:
    """The engine ``SSEHUB_BROKER`` names, chosen once here."""
    if settings.broker == "nats":
        from app.realtime.nats_broker import NatsBroker

        assert settings.secret_key, "ensure_secret_key() runs before the app is built"
        return NatsBroker(
            settings.nats_url,
            pool,
            metrics,
            settings.secret_key,
            settings.nats_pending_limit,
            creds=settings.nats_creds,
            ca_file=settings.nats_tls_ca_file,
        )
    return PostgresBroker(pool, metrics)


@contextmanager
def streams_closed_on_signal(hub: Hub) -> Iterator[None]:
    """Chain to the server's SIGTERM/SIGINT handlers: first close every stream.

    uvicorn installs its handlers before the lifespan starts; it then waits
    for open responses, which for streams would be forever.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(hub.close_all, "shutdown")
        chained: Callable[[int, FrameType | None], Any] | int | None = previous.get(sig)
        if callable(chained):
            chained(sig, frame)

    for shutdown_signal in SHUTDOWN_SIGNALS:
        previous[int(shutdown_signal)] = signal.signal(shutdown_signal, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            if signal.getsignal(number) is handler:
                signal.signal(number, old)
