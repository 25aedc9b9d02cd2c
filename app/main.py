"""``create_app(settings)``: wiring and lifespan, nothing else.

The lifespan builds the runtime once per process (``app.lifespan.running``:
every shared part, typed, in ``app.runtime.Runtime``) and keeps it on
``app.state.runtime``, the only thing the app's state holds.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app import ops
from app.auth.api_key_routes import router as api_keys_router
from app.auth.routes import router as auth_router
from app.channels.routes import router as channels_router
from app.config import Settings, ensure_secret_key
from app.errors import error_responses, install_error_handlers
from app.events.routes import router as events_router
from app.hotpaths import HotPaths
from app.lifespan import running
from app.limits import BodyLimit
from app.logs import install_token_redaction
from app.metrics import Metrics
from app.realtime.routes import router as realtime_router
from app.users.routes import router as users_router

STATIC_DIR = Path(__file__).parent / "static"
# What the routes of each router may answer besides success, all as {"detail": ...}:
# declared once here, so that /docs shows them and the fuzzing
# (tests/test_fuzz.py) holds every answer to the schema. 503 is the database away.
ROUTER_ERRORS = (
    (auth_router, error_responses(400, 401, 403, 409, 413, 422, 429, 503)),
    (users_router, error_responses(400, 401, 403, 404, 413, 422, 503)),
    (api_keys_router, error_responses(400, 401, 403, 404, 413, 422, 503)),
    (channels_router, error_responses(400, 401, 403, 404, 409, 413, 422, 503)),
    (events_router, error_responses(400, 401, 403, 404, 413, 422, 503)),
    (realtime_router, error_responses(400, 401, 403, 404, 422, 429, 503)),
)


def create_app(settings: Settings) -> ASGIApp:
    """Build the ASGI app; ``settings.database_url`` must be resolved already.

    The FastAPI app, with the hot paths in front of it (``app.hotpaths``), which
    send every request that has a body through the body limits
    (``app.limits``: the first to see a body), then CORS when configured (so a
    browser can read a 413), and outermost the trusted proxies'
    ``X-Forwarded-For``, when configured, so that every layer sees the same
    client address.
    """
    if not settings.database_url:
        raise ValueError(
            "create_app needs settings.database_url (the CLI resolves the embedded one)"
        )
    settings = ensure_secret_key(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_token_redaction()
        tune_garbage_collector()
        async with running(settings, metrics) as runtime:
            app.state.runtime = runtime
            yield

    app = FastAPI(
        title="ssehub",
        summary="Server-Sent Events with JWT auth, Postgres channels and exact resume",
        default_response_class=JSONResponse,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(ops.router)
    for router, errors in ROUTER_ERRORS:
        app.include_router(router, responses=errors)
    if STATIC_DIR.joinpath("index.html").exists():
        # The page is what the router answers for paths no route knows. Not a mount
        # at "/": a mount matches every path first, so GET /auth/register would be
        # its 404, not the route's 405, and DELETE /channels its 405 with "Allow:
        # GET, HEAD".
        app.router.default = StaticPage(directory=STATIC_DIR, html=True)
    served: ASGIApp = HotPaths(app, BodyLimit(settings))
    if settings.cors_origin_list:
        served = CORSMiddleware(
            served,
            allow_origins=settings.cors_origin_list,
            # For the stream cookie: a page on exactly these origins may open a
            # stream with credentials; any other origin gets no CORS headers.
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["*"],
        )
    if settings.trusted_proxy_list:
        # uvicorn types ASGI apps more narrowly than Starlette: the same protocol.
        proxied = ProxyHeadersMiddleware(cast(Any, served), settings.trusted_proxy_list)
        served = cast(ASGIApp, proxied)
    return served


class StaticPage(StaticFiles):
    """``app/static``: the page, and ``/ssehub-client.js`` (the browser client's
    build). ``no-cache``: a browser keeps the files but asks each time, getting
    a 304 through the ETag, so after an upgrade no page runs an old client."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


GC_THRESHOLDS = (50_000, 20, 100)


def tune_garbage_collector() -> None:
    """Collect garbage less often, and never look at what start-up made again.

    Every open stream holds about 80 tracked objects, and every wake-up makes a
    future that lives until the stream has written. With CPython's default
    thresholds those futures outlive the frequent young collections, reach the
    oldest generation, and set off full collections of every stream's objects
    (half a second each at 10,000 streams). Rarer young collections let them
    die young: 64k → 87k deliveries/s at 10,000 streams x 10 events/s.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_app_from_env() -> ASGIApp:
    """Factory for ``uvicorn --factory`` and the CLI's workers: settings from the environment."""
    return create_app(Settings())
