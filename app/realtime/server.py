"""Running uvicorn (``ssehub serve``).

uvicorn alone waits for every response to finish before it exits, and an
SSE response never finishes: ``app.realtime.lifespan`` chains a handler to
uvicorn's SIGTERM/SIGINT handler that closes every stream at once, and the
graceful-shutdown deadline below bounds whatever is left.

The limits on what arrives before the app sees it (``app.limits``) are set
here: the protocol that bounds request heads and bodies and drops responses
nobody reads, the connection caps, no WebSocket upgrades (ssehub serves none,
and an upgraded connection would leave the protocol's counts), and no
``X-Forwarded-For`` trusted by default (uvicorn trusts it from 127.0.0.1,
which would let any local client choose its address; ``app.main`` trusts
exactly ``SSEHUB_TRUSTED_PROXIES``).
"""

from __future__ import annotations

import functools

import uvicorn

from app.config import Settings
from app.limits import (
    ConnectionLimits,
    LimitedProtocol,
    missing_uvicorn_hooks,
    uvicorn_limit_concurrency,
)
from app.logs import install_token_redaction

GRACEFUL_SHUTDOWN_SECONDS = 3


def run_server(host: str, port: int, workers: int, settings: Settings) -> None:
    install_token_redaction()
    missing = missing_uvicorn_hooks()
    if missing:
        raise SystemExit(
            f"ssehub: this uvicorn lacks {', '.join(missing)}: connection limits cannot run"
        )
    # A partial of the class, not a class made here: with --workers uvicorn
    # pickles its configuration for each worker process.
    protocol = functools.partial(LimitedProtocol, limits=ConnectionLimits.from_settings(settings))
    uvicorn.run(
        "app.main:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        access_log=settings.access_log,
        http=protocol,  # type: ignore[arg-type]
        ws="none",
        limit_concurrency=uvicorn_limit_concurrency(settings.max_connections),
        proxy_headers=False,
    )
