"""Retention by count and by age, pruned_through, and expiry of idempotency keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tests.support import Api, sql


def _eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _fast_retention(start_server) -> Api:  # type: ignore[no-untyped-def]
    return Api(start_server(SSEHUB_RETENTION_INTERVAL_SECONDS="0.1").url)


def test_max_events_keeps_the_newest(start_server, database_url: str) -> None:
    api = _fast_retention(start_server)
    admin = api.admin()
    api.http.post("/channels", json={"name": "short", "max_events": 3}, headers=admin)
    api.http.post("/channels", json={"name": "forever"}, headers=admin)
    r = api.http.post(
        "/channels/short/events/batch",
        json={"events": [{"data": i} for i in range(10)]},
        headers=admin,
    )
    ids = [e["id"] for e in r.json()["events"]]
    api.http.post(
        "/channels/forever/events/batch",
        json={"events": [{"data": i} for i in range(10)]},
        headers=admin,
    )

    def kept() -> list[int]:
        return [
            e["id"] for e in api.http.get("/channels/short/events", headers=admin).json()["events"]
        ]

    _eventually(lambda: kept() == ids[-3:])
    pruned = asyncio.run(
        sql(database_url, "SELECT pruned_through FROM channels WHERE name = 'short'")
    )
    assert pruned[0][0] == ids[-4]
    assert len(api.http.get("/channels/forever/events", headers=admin).json()["events"]) == 10


def test_max_age_removes_old_events(start_server, database_url: str) -> None:
    api = _fast_retention(start_server)
    admin = api.admin()
    api.http.post("/channels", json={"name": "fresh", "max_age_seconds": 1}, headers=admin)
    old = api.http.post("/channels/fresh/events", json={"data": "old"}, headers=admin).json()["id"]
    time.sleep(1.2)
    new = api.http.post("/channels/fresh/events", json={"data": "new"}, headers=admin).json()["id"]

    def kept() -> list[int]:
        return [
            e["id"] for e in api.http.get("/channels/fresh/events", headers=admin).json()["events"]
        ]

    _eventually(lambda: kept() == [new])
    pruned = asyncio.run(
        sql(database_url, "SELECT pruned_through FROM channels WHERE name = 'fresh'")
    )
    assert pruned[0][0] == old


def test_idempotency_keys_expire_after_24_hours(start_server, database_url: str) -> None:
    api = _fast_retention(start_server)
    admin = api.admin()
    api.http.post("/channels", json={"name": "news"}, headers=admin)
    keyed = {**admin, "Idempotency-Key": "daily"}
    first = api.http.post("/channels/news/events", json={"data": 1}, headers=keyed)
    assert first.status_code == 201
    assert (
        api.http.post("/channels/news/events", json={"data": 1}, headers=keyed).status_code == 200
    )
    asyncio.run(
        sql(
            database_url,
            "UPDATE events SET published_at = now() - interval '25 hours' WHERE id = $1",
            first.json()["id"],
        )
    )

    def key_cleared() -> bool:
        rows = asyncio.run(
            sql(
                database_url, "SELECT idempotency_key FROM events WHERE id = $1", first.json()["id"]
            )
        )
        return rows[0][0] is None

    _eventually(key_cleared)
    again = api.http.post("/channels/news/events", json={"data": 2}, headers=keyed)
    assert again.status_code == 201 and again.json()["id"] != first.json()["id"]
