"""Errors (``app.errors``): one JSON shape with the right status and headers, and
which failures mean "the database is away" (503) rather than a bug (500)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import orjson
import pytest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.errors import (
    Conflict,
    SsehubError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    database_unavailable,
    render_error,
    unexpected_error,
)


def test_an_error_renders_as_detail_with_its_status() -> None:
    response = render_error(Conflict("Channel exists"))
    assert response.status_code == 409
    assert orjson.loads(response.body) == {"detail": "Channel exists"}


def test_unauthorized_asks_for_a_bearer_token() -> None:
    response = render_error(Unauthorized())
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert orjson.loads(response.body) == {"detail": "Not authenticated"}


def test_extra_headers_add_to_the_class_headers_without_changing_them() -> None:
    error = Unauthorized("expired", headers={"X-Reason": "expiry"})
    assert error.headers == {"WWW-Authenticate": "Bearer", "X-Reason": "expiry"}
    assert Unauthorized.headers == {"WWW-Authenticate": "Bearer"}
    assert SsehubError().detail == "SsehubError" and SsehubError.status_code == 400


@pytest.mark.parametrize(("after", "header"), [(0, "1"), (0.2, "1"), (1.0, "1"), (2.01, "3")])
def test_retry_after_is_whole_seconds_at_least_one(after: float, header: str) -> None:
    response = render_error(TooManyRequests("slow down", retry_after=after))
    assert response.status_code == 429 and response.headers["retry-after"] == header


def _postgres_error(sqlstate: str) -> asyncpg.PostgresError:
    error = asyncpg.PostgresError("from the server")
    error.sqlstate = sqlstate
    return error


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(),
        TimeoutError(),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InternalClientError("another operation is in progress"),
        _postgres_error("08006"),  # connection failure
        _postgres_error("57P01"),  # admin shutdown
        _postgres_error("57P03"),  # cannot connect now
        _postgres_error("53300"),  # too many connections
        PoolTimeout(),
        DBAPIError("SELECT 1", {}, ConnectionResetError()),  # wrapped, as SQLAlchemy does
    ],
)
def test_a_database_that_is_away_is_told_apart(exc: BaseException) -> None:
    assert database_unavailable(exc)


def test_the_cause_chain_is_followed_and_a_cycle_ends() -> None:
    outer = RuntimeError("while publishing")
    outer.__cause__ = OSError("reset")
    assert database_unavailable(outer)
    loop = RuntimeError("a")
    loop.__context__ = ValueError("b")
    loop.__context__.__context__ = loop
    assert not database_unavailable(loop)


@pytest.mark.parametrize(
    "exc", [ValueError(), _postgres_error("23505"), _postgres_error(""), KeyError("x")]
)
def test_other_failures_are_not_the_database_being_away(exc: BaseException) -> None:
    assert not database_unavailable(exc)


def test_an_unexpected_error_is_a_500_without_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="ssehub"):
        response = unexpected_error(ValueError("secret internals"), "GET /x")
    assert response.status_code == 500
    assert orjson.loads(response.body) == {"detail": "Internal server error"}
    assert b"secret" not in response.body and "secret internals" in caplog.text


def test_a_database_outage_is_a_503_to_retry() -> None:
    response = unexpected_error(asyncpg.InterfaceError("closed"), "GET /x")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert orjson.loads(response.body) == {"detail": Unavailable().detail}


async def _connect_that_times_out() -> None:
    async with asyncio.timeout(0):
        await asyncio.sleep(1)


async def test_a_database_outage_is_logged_with_where_it_was_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bare ``TimeoutError`` (a connect, a pool or a query ran out) says nothing by
    its message; the log line names the function it was raised in."""
    try:
        await _connect_that_times_out()
    except TimeoutError as exc:
        with caplog.at_level(logging.WARNING, logger="ssehub"):
            response = unexpected_error(exc, "POST /channels")
    assert response.status_code == 503
    line = caplog.messages[-1]
    assert line.startswith("POST /channels: database unavailable (TimeoutError: , in "), line
    # The function that waited, not asyncio's timeout below it.
    assert line.endswith(f"in {__name__}:_connect_that_times_out)"), line
