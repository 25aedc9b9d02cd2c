"""Start and stop the auth parts: the login throttle and the identity verifiers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.auth.identity import Identity
from app.auth.throttle import LoginThrottle


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    throttle = LoginThrottle(settings.login_attempts_per_minute)
    identity = Identity(settings, app.state.pool)
    app.state.login_throttle, app.state.identity = throttle, identity
    identity.start()
    try:
        yield
    finally:
        await identity.stop()
        throttle.close()
