"""One error base, one handler: every error is JSON ``{"detail": ...}``.

Services raise a subclass of ``SsehubError``; ``install_error_handlers`` renders
it, and also maps FastAPI's request validation so a body that is not JSON at
all is a 400 while a JSON body with a bad field is a 422.

A database that is away (restarting, failing over, out of connections, or
simply not answering in time) is not a bug: whatever it interrupts answers
503 with ``Retry-After``, never 500 (``database_unavailable``).
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Mapping
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ssehub")


class SsehubError(Exception):
    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail if detail is not None else self.default_detail()
        if headers is not None:
            self.headers = {**(self.headers or {}), **headers}

    def default_detail(self) -> str:
        return type(self).__name__


class BadRequest(SsehubError):
    status_code = 400


class Unauthorized(SsehubError):
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}

    def default_detail(self) -> str:
        return "Not authenticated"


class Forbidden(SsehubError):
    status_code = 403


class NotFound(SsehubError):
    status_code = 404


class Conflict(SsehubError):
    status_code = 409


class PayloadTooLarge(SsehubError):
    status_code = 413


class Invalid(SsehubError):
    status_code = 422


class TooManyRequests(SsehubError):
    status_code = 429

    def __init__(self, detail: Any = None, retry_after: float = 1) -> None:
        super().__init__(detail, {"Retry-After": str(max(1, math.ceil(retry_after)))})


class Unavailable(SsehubError):
    status_code = 503
    headers = {"Retry-After": "1"}

    def default_detail(self) -> str:
        return "The database is unavailable; retry shortly"


# SQLSTATEs of a server that is going away or not there yet (57P01 admin shutdown,
# 57P02 crash shutdown, 57P03 cannot connect now) or out of connections (53300).
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the database is away rather than
    that the request was wrong: a lost or refused connection, a server shutting
    down or starting up, a pool with no connection free in time, a query timeout.

    SQLAlchemy wraps asyncpg's errors (``DBAPIError.orig`` and the exception
    chain), so the chain is followed down to the driver's own exception.

    ``asyncpg.InternalClientError`` counts too: a pooled connection whose backend
    was just terminated has read the server's FATAL but not yet its end of
    stream, so the pool still hands it out, and its next query fails with
    "cannot switch to state ...; another operation (2) is in progress" (state 2:
    consuming that error): a stream opened at that moment would answer 500
    (``tests/e2e/test_database_faults.py``).
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # InternalClientError: asyncpg read the FATAL of a terminated backend but
        # not yet the end of the socket, and the next query finds the protocol
        # still consuming that error (seen in tests/test_attacks.py).
        if isinstance(
            current,
            OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError,
        ):
            return True
        if isinstance(current, asyncpg.PostgresError):
            state = getattr(current, "sqlstate", "") or ""
            if state.startswith("08") or state in _UNAVAILABLE_STATES:
                return True
        if isinstance(current, SQLAlchemyTimeout):
            return True  # QueuePool: no connection free within pool_timeout
        todo += [getattr(current, "orig", None), current.__cause__, current.__context__]
    return False


class FieldError(BaseModel):
    """One invalid field of a 422: its kind, where it is, what is wrong."""

    type: str
    loc: list[str | int]
    msg: str


class ErrorOut(BaseModel):
    """The body of every error: a sentence, or for a 422 the invalid fields."""

    detail: str | list[FieldError]


ERROR_DESCRIPTIONS = {
    400: "Malformed: a body that is not JSON, a bad header or resume position",
    401: "No or bad credentials",
    403: "Authenticated but not allowed",
    404: "Unknown, or a private channel the caller may not see",
    409: "Conflict: the name is taken",
    413: "Too large: a body or an event's data past its limit",
    422: "Invalid field",
    429: "Too many: failed logins, or open streams",
    503: "The database is unavailable, or the instance is at its connection cap: retry",
}
_ERROR_HEADERS = {401: "WWW-Authenticate", 429: "Retry-After", 503: "Retry-After"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all in the one format
    (``ErrorOut``), with the header each always carries; for ``include_router``."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[status]}
        if status in _ERROR_HEADERS:
            schema = {"schema": {"type": "string"}, "required": True}
            response["headers"] = {_ERROR_HEADERS[status]: schema}
        responses[status] = response
    return responses


def error_response(
    status: int, detail: Any, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def render_error(exc: SsehubError | RequestValidationError) -> JSONResponse:
    """Our errors and request validation as JSON: the handlers FastAPI calls use
    this, and so does ``app.hotpaths``, which runs outside FastAPI's routing."""
    if isinstance(exc, SsehubError):
        return error_response(exc.status_code, exc.detail, exc.headers)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "Request body is not valid JSON")
    return error_response(422, _jsonable(errors))


async def _handled_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SsehubError | RequestValidationError)
    return render_error(exc)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, exc.detail, exc.headers)


def unexpected_error(exc: Exception, where: str) -> JSONResponse:
    """What an exception nobody handled answers: 503 when the database is away
    (logged as one line), else a 500 in the one error format, its traceback
    logged, never sent to the client."""
    if database_unavailable(exc):
        log.warning(
            "%s: database unavailable (%s: %s, in %s)",
            where,
            type(exc).__name__,
            exc,
            _innermost(exc),
        )
        return render_error(Unavailable())
    log.error("unexpected error in %s", where, exc_info=exc)
    return error_response(500, "Internal server error")


def _innermost(exc: BaseException) -> str:
    """Where ``exc`` was raised, as ``module:function``, asyncio's own frames left
    out: a bare ``TimeoutError`` says nothing of which wait ran out (a connect,
    a pool, a query); the function that waited does."""
    where = "?"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = frame.f_globals.get("__name__", "?")
        if module != "asyncio" and not module.startswith("asyncio."):
            where = f"{module}:{frame.f_code.co_name}"
    return where


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_error(exc, f"{request.method} {request.url.path}")


def _jsonable(errors: Any) -> list[dict[str, Any]]:
    """Keep ``type``, ``loc`` and ``msg`` of validation errors: ``ctx`` may hold
    exception objects, and ``input`` would echo a password back."""
    return [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SsehubError, _handled_error)
    app.add_exception_handler(RequestValidationError, _handled_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # The database's own errors are handled here (not re-raised to the server, as
    # Starlette does with a bare ``Exception`` handler): a restart must answer
    # 503s, not fill the log with tracebacks.
    for database_error in (
        SQLAlchemyError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        OSError,
    ):
        app.add_exception_handler(database_error, _unexpected_error)
    app.add_exception_handler(Exception, _unexpected_error)
