"""Retention by count and by age, pruned_through, and expiry of idempotency keys."""

from __future__ import annotations

import asyncio

from tests.support import Api, sql, wait_until


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

    wait_until(lambda: kept() == ids[-3:], "the oldest events pruned")
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

    def old_enough() -> bool:
        """Older than the channel's max age by the database's clock, which retention
        reads (or gone already: retention saw it so)."""
        age = "SELECT now() - published_at > interval '1 second' FROM events WHERE id = $1"
        rows = asyncio.run(sql(database_url, age, old))
        return rows == [] or bool(rows[0][0])

    wait_until(old_enough, "the old event to pass the channel's max age")
    new = api.http.post("/channels/fresh/events", json={"data": "new"}, headers=admin).json()["id"]

    def kept() -> list[int]:
        return [
            e["id"] for e in api.http.get("/channels/fresh/events", headers=admin).json()["events"]
        ]

    wait_until(lambda: kept() == [new], "the old event pruned")
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
            "UPDATE idempotency_keys SET published_at = now() - interval '25 hours'",
        )
    )

    def key_cleared() -> bool:
        return asyncio.run(sql(database_url, "SELECT 1 FROM idempotency_keys")) == []

    wait_until(key_cleared, "the idempotency key expired")
    again = api.http.post("/channels/news/events", json={"data": 2}, headers=keyed)
    assert again.status_code == 201 and again.json()["id"] != first.json()["id"]


def test_retention_deleting_the_event_does_not_revive_its_key(
    start_server, database_url: str
) -> None:
    """A key lasts 24 h even when retention removes its event sooner: a retry an
    hour later must not publish a second time."""
    api = _fast_retention(start_server)
    admin = api.admin()
    api.http.post("/channels", json={"name": "short", "max_events": 1}, headers=admin)
    keyed = {**admin, "Idempotency-Key": "order-42"}
    first = api.http.post("/channels/short/events", json={"data": {"n": 1}}, headers=keyed)
    assert first.status_code == 201
    later = api.http.post("/channels/short/events", json={"data": "pushes it out"}, headers=admin)

    def pruned() -> bool:
        history = api.http.get("/channels/short/events", headers=admin).json()["events"]
        return [e["id"] for e in history] == [later.json()["id"]]

    wait_until(pruned, "the channel pruned")
    retry = api.http.post("/channels/short/events", json={"data": {"n": 1}}, headers=keyed)
    assert retry.status_code == 200, retry.text
    assert retry.json() == first.json()
    history = api.http.get("/channels/short/events", headers=admin).json()["events"]
    assert [e["id"] for e in history] == [later.json()["id"]]
