"""Fixtures: one fresh database per test run, clean tables per test, real servers.

``SSEHUB_TEST_DATABASE_URL`` (any database on the server; CI points it at the
local Postgres) is where test databases are created; without it an embedded
Postgres under ``.ssehub-test/`` is used, so the suite needs nothing installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.support import (
    ROOT,
    Api,
    Server,
    migrated_database,
    reset_database,
)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A URL of a maintenance database on the Postgres the tests may use."""
    url = os.environ.get("SSEHUB_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from app.db import start_embedded_postgres

    url, server = start_embedded_postgres(ROOT / ".ssehub-test")
    try:
        yield url
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A database made for this run, migrated to head, dropped afterwards."""
    with migrated_database(postgres_server_url, "ssehub_test") as url:
        yield url


@pytest.fixture(autouse=True)
def clean_db(request: pytest.FixtureRequest) -> None:
    """Every test starts with empty tables and an admin ``admin``/ADMIN_PASSWORD."""
    if "database_url" not in request.fixturenames:
        return
    url = request.getfixturevalue("database_url")
    reset_database(url)


@pytest.fixture(scope="session")
def server(database_url: str) -> Iterator[Server]:
    """One ``ssehub serve`` shared by the tests that need no special settings."""
    srv = Server(database_url).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def start_server(database_url: str) -> Iterator[Callable[..., Server]]:
    """Start extra servers with their own environment; all stopped after the test."""
    started: list[Server] = []

    def start(workers: int = 1, **env: str) -> Server:
        srv = Server(database_url, env=env, workers=workers).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def api(server: Server, database_url: str) -> Iterator[Api]:
    client = Api(server.url)
    yield client
    client.http.close()
