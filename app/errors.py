"""One error base, one handler: every error is JSON ``{"detail": ...}``.

Services raise a subclass of ``SsehubError``; ``install_error_handlers`` renders
it, and also maps FastAPI's request validation so a body that is not JSON at
all is a 400 while a JSON body with a bad field is a 422.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ssehub")


class SsehubError(Exception):
    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, detail: Any = None) -> None:
        super().__init__(detail)
        self.detail = detail if detail is not None else self.default_detail()

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


class Unavailable(SsehubError):
    status_code = 503


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


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    """A bug still answers in the one error format; the traceback goes to the log
    (Starlette re-raises after this handler), never to the client."""
    return error_response(500, "Internal server error")


def _jsonable(errors: Any) -> list[dict[str, Any]]:
    """Keep ``type``, ``loc`` and ``msg`` of validation errors: ``ctx`` may hold
    exception objects, and ``input`` would echo a password back."""
    return [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SsehubError, _handled_error)
    app.add_exception_handler(RequestValidationError, _handled_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
