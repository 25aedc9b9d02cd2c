"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from app.db import raw_connection
from app.realtime.broker import STUCK_SECONDS
from app.runtime import runtime

router = APIRouter(tags=["operations"])


class Readiness(BaseModel):
    """``/readyz``: ``ok`` or ``unavailable``, and each check that decides it."""

    status: str
    database: bool
    listener: bool
    broker: bool
    writer: bool


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process runs."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: {"model": Readiness, "description": "Ready"},
        503: {"model": Readiness, "description": "Not ready: a check failed"},
    },
)
async def readyz(request: Request) -> JSONResponse:
    """200 when the database answers, the cross-instance listener is up, the
    broker delivers (``Broker.health``) and the writer is not stuck; else 503."""
    state, now = runtime(request), time.monotonic()
    checks = {
        "database": await _database_ok(request),
        "listener": state.listener.listening and state.listener.stuck_for(now) < STUCK_SECONDS,
        "broker": state.broker.health().ok,
        "writer": state.publisher.stuck_for(now) < STUCK_SECONDS,
    }
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503
    )


async def _database_ok(request: Request) -> bool:
    """One query on the hot paths' pool, within 2 s."""
    try:
        async with asyncio.timeout(2), raw_connection(runtime(request).pool) as conn:
            await conn.fetchval("SELECT 1")
        return True
    except Exception:
        return False


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    body = generate_latest(runtime(request).metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
