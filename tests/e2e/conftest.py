"""Helpers for stream tests: channels, publishing, opening streams on a server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import ADMIN_PASSWORD, Api, Db, Hubs, NatsServer


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server of the test module's own."""
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def db(database_url: str) -> Iterator[Db]:
    conn = Db(database_url)
    yield conn
    conn.close()


@pytest.fixture
def hubs(api: Api) -> Iterator[Hubs]:
    h = Hubs(api)
    yield h
    h.close_all()


@pytest.fixture
def admin_token(api: Api) -> str:
    return api.login("admin", ADMIN_PASSWORD)
