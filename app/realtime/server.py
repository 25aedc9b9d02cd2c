"""Running uvicorn (``ssehub serve``).

uvicorn alone waits for every response to finish before it exits, and an
SSE response never finishes: ``app.realtime.lifespan`` chains a handler to
uvicorn's SIGTERM/SIGINT handler that closes every stream at once, and the
graceful-shutdown deadline below bounds whatever is left.

The limits on what arrives before the app sees it (``app.limits``) are set
here: the protocol that bounds request heads, the connection cap, and no
``X-Forwarded-For`` trusted by default (uvicorn trusts it from 127.0.0.1,
which would let any local client choose its address; ``app.main`` trusts
exactly ``SSEHUB_TRUSTED_PROXIES``).
"""

from __future__ import annotations

import uvicorn

from app.limits import HeadLimitedProtocol, missing_uvicorn_hooks, uvicorn_limit_concurrency
from app.logs import install_token_redaction

GRACEFUL_SHUTDOWN_SECONDS = 3


def run_server(
    host: str, port: int, workers: int, max_connections: int, access_log: bool = True
) -> None:
    install_token_redaction()
    missing = missing_uvicorn_hooks()
    if missing:
        raise SystemExit(f"ssehub: this uvicorn lacks {', '.join(missing)}: head limits cannot run")
    uvicorn.run(
        "app.main:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        access_log=access_log,
        http=HeadLimitedProtocol,
        limit_concurrency=uvicorn_limit_concurrency(max_connections),
        proxy_headers=False,
    )
