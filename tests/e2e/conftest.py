"""Helpers for stream tests: channels, publishing, opening streams on a server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from app.db import asyncpg_dsn
from tests.e2e.sse_client import SseStream
from tests.support import ADMIN_PASSWORD, Api, NatsServer


class Db:
    """One connection to the test database driven step by step from a sync test,
    so a transaction (or a lock) can stay open across steps."""

    def __init__(self, url: str) -> None:
        self._runner = asyncio.Runner()
        self.conn: Any = self._runner.run(asyncpg.connect(asyncpg_dsn(url)))

    def fetch(self, query: str, *args: Any) -> list[Any]:
        rows: list[Any] = self._runner.run(self.conn.fetch(query, *args))
        return rows

    def execute(self, script: str) -> None:
        self._runner.run(self.conn.execute(script))

    def close(self) -> None:
        self._runner.run(self.conn.close())
        self._runner.close()


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server of the test module's own (``tests.e2e.nats_server``)."""
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


class Hubs:
    """Admin actions and stream opening against one base URL."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.admin = api.admin()
        self.opened: list[SseStream] = []

    def channel(self, name: str, **fields: Any) -> None:
        r = self.api.http.post("/channels", json={"name": name, **fields}, headers=self.admin)
        assert r.status_code == 201, r.text

    def publish(
        self, channel: str, data: Any = None, type_: str = "message", base: str | None = None
    ) -> int:
        url = f"{base or self.api.base_url}/channels/{channel}/events"
        r = httpx.post(url, json={"type": type_, "data": data}, headers=self.admin, timeout=30)
        assert r.status_code == 201, r.text
        event_id: int = r.json()["id"]
        return event_id

    def stream_token(self, headers: dict[str, str]) -> str:
        r = self.api.http.post("/auth/stream-token", headers=headers)
        assert r.status_code == 200, r.text
        token: str = r.json()["stream_token"]
        return token

    def open(self, path: str, token: str, base: str | None = None, **kwargs: Any) -> SseStream:
        """Open ``path`` with ``?access_token=`` (``path`` may carry its own query)."""
        sep = "&" if "?" in path else "?"
        stream = SseStream(f"{base or self.api.base_url}{path}{sep}access_token={token}", **kwargs)
        self.opened.append(stream)
        return stream

    def close_all(self) -> None:
        for stream in self.opened:
            stream.close()


@pytest.fixture
def hubs(api: Api) -> Iterator[Hubs]:
    h = Hubs(api)
    yield h
    h.close_all()


@pytest.fixture
def admin_token(api: Api) -> str:
    return api.login("admin", ADMIN_PASSWORD)
