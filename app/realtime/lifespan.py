"""Start and stop the hub (and its ticker) and the broker; end streams as soon as shutdown begins."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI

from app.realtime.access import StreamAccessCache
from app.realtime.broker import Broker, PostgresBroker
from app.realtime.control import StreamControl
from app.realtime.hub import Hub
from app.realtime.listener import Listener
from app.realtime.replay import SharedPages

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    broker = _broker(app)
    hub = Hub(
        app.state.metrics, broker, settings.max_streams_per_user, settings.send_timeout_seconds
    )
    app.state.stream_access = StreamAccessCache()
    app.state.replays = SharedPages(app.state.pool, hub)
    handlers = [
        StreamControl(hub, app.state.stream_access),
        app.state.publish_rights,
        app.state.identity,
    ]
    await broker.start(hub)
    running_broker = asyncio.create_task(broker.run(), name="broker")
    listen_url = settings.listen_database_url or settings.database_url
    listener = Listener(listen_url, broker.log_tail(), handlers, app.state.publisher.inbox_due)
    listener.start()
    app.state.publisher.on_commit = broker.committed
    app.state.hub, app.state.broker, app.state.listener = hub, broker, listener
    ticker = asyncio.create_task(hub.tick_forever(settings.heartbeat_seconds), name="hub-ticker")
    try:
        with streams_closed_on_signal(hub):
            yield
    finally:
        hub.close_all("shutdown")
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await listener.stop()
        running_broker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running_broker
        await broker.stop()


def _broker(app: FastAPI) -> Broker:
    """The engine ``SSEHUB_BROKER`` names, chosen once here."""
    settings, metrics = app.state.settings, app.state.metrics
    if settings.broker == "nats":
        from app.realtime.nats_broker import NatsBroker

        key = settings.secret_key
        assert key, "ensure_secret_key() runs before the app is built"
        return NatsBroker(
            settings.nats_url,
            app.state.pool,
            metrics,
            key,
            settings.nats_pending_limit,
            creds=settings.nats_creds,
            ca_file=settings.nats_tls_ca_file,
        )
    return PostgresBroker(app.state.pool, metrics)


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
