"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from app.db import raw_connection

router = APIRouter(tags=["operations"])
# The writer's statements wait for the publish lock, and the broker's reads for
# nothing but an exclusive lock on the log: either busy this long means this
# instance cannot publish or deliver now, and it leaves its load balancer
# (their queries time out at ``app.db.QUERY_TIMEOUT_SECONDS`` and retry).
STUCK_SECONDS = 5.0


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
    """200 when the database answers, the cross-instance listener is up, and
    neither the writer nor the listener's loop is stuck; else 503."""
    state, now = request.app.state, time.monotonic()
    checks = {
        "database": await _database_ok(request),
        "listener": bool(state.listener.listening),
        "broker": state.listener.stuck_for(now) < STUCK_SECONDS,
        "writer": state.publisher.stuck_for(now) < STUCK_SECONDS,
    }
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503
    )


async def _database_ok(request: Request) -> bool:
    """One query on the hot paths' pool, within 2 s."""
    try:
        async with asyncio.timeout(2), raw_connection(request.app.state.pool) as conn:
            await conn.fetchval("SELECT 1")
        return True
    except Exception:
        return False


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
