"""Publishing (single, batch, idempotent) and history."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import re
import time

import pytest

from tests.support import Api, sql
from tests.support.inprocess import in_process

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def admin(api: Api) -> dict[str, str]:
    headers = api.admin()
    assert api.http.post("/channels", json={"name": "news"}, headers=headers).status_code == 201
    return headers


def _history(api: Api, admin: dict[str, str], query: str = "") -> dict[str, object]:
    r = api.http.get(f"/channels/news/events{query}", headers=admin)
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def test_publish_returns_the_event(api: Api, admin: dict[str, str]) -> None:
    data = {"text": "hé ☃", "nested": [1, 2.5, None, True, {"k": "v"}], "big": 2**63 - 1}
    r = api.http.post(
        "/channels/news/events", json={"type": "chat.msg", "data": data}, headers=admin
    )
    assert r.status_code == 201
    event = r.json()
    assert set(event) == {"id", "channel", "type", "data", "published_at"}
    assert event["channel"] == "news" and event["type"] == "chat.msg" and event["data"] == data
    assert TIMESTAMP.match(event["published_at"])
    assert _history(api, admin)["events"] == [event]


@pytest.mark.parametrize("data", [None, 0, "", [], {}, "x" * 100])
def test_any_json_data(api: Api, admin: dict[str, str], data: object) -> None:
    r = api.http.post("/channels/news/events", json={"data": data}, headers=admin)
    assert r.status_code == 201 and r.json()["data"] == data and r.json()["type"] == "message"


@pytest.mark.parametrize("type_", ["a" * 65, "", "has space", "ssehub.live", "ssehub.x", "é"])
def test_invalid_types_are_422(api: Api, admin: dict[str, str], type_: str) -> None:
    r = api.http.post("/channels/news/events", json={"type": type_, "data": 1}, headers=admin)
    assert r.status_code == 422


def test_valid_types(api: Api, admin: dict[str, str]) -> None:
    for type_ in ("a:b.c-d_E9", "x" * 64, "ssehubx"):
        assert (
            api.http.post(
                "/channels/news/events", json={"type": type_, "data": 1}, headers=admin
            ).status_code
            == 201
        )


def test_bad_bodies(api: Api, admin: dict[str, str]) -> None:
    post = api.http.post
    assert post("/channels/news/events", json={"type": "x"}, headers=admin).status_code == 422
    assert (
        post("/channels/news/events", json={"data": 1, "extra": 2}, headers=admin).status_code
        == 422
    )
    assert post("/channels/news/events", json=[1], headers=admin).status_code == 422
    for raw in (b"{", b'{"data": NaN}', b'{"data": Infinity}', b"\xff", b""):
        assert post("/channels/news/events", content=raw, headers=admin).status_code == 400
    assert post("/channels/nope/events", json={"data": 1}, headers=admin).status_code == 404
    assert _history(api, admin)["events"] == []


def test_size_limit_on_compact_json(database_url: str) -> None:
    with in_process(database_url, SSEHUB_MAX_EVENT_BYTES="100") as api:
        _size_limit_on_compact_json(api)


def _size_limit_on_compact_json(api: Api) -> None:
    admin = api.admin()
    api.http.post("/channels", json={"name": "news"}, headers=admin)
    exact = "x" * 98  # "..." is 100 bytes as compact JSON
    assert (
        api.http.post("/channels/news/events", json={"data": exact}, headers=admin).status_code
        == 201
    )
    r = api.http.post("/channels/news/events", json={"data": exact + "x"}, headers=admin)
    assert r.status_code == 413 and "detail" in r.json()
    # Bytes, not characters: "é" is two bytes in UTF-8.
    r = api.http.post("/channels/news/events", json={"data": "é" * 60}, headers=admin)
    assert r.status_code == 413
    assert (
        api.http.post("/channels/news/events", json={"data": "é" * 49}, headers=admin).status_code
        == 201
    )
    # Whitespace in the request does not count: the limit is on compact JSON.
    spaced = b'{"data": [1,    2,     3]}'
    assert api.http.post("/channels/news/events", content=spaced, headers=admin).status_code == 201
    batch = {"events": [{"data": 1}, {"data": exact + "x"}]}
    assert (
        api.http.post("/channels/news/events/batch", json=batch, headers=admin).status_code == 413
    )
    assert len(api.http.get("/channels/news/events", headers=admin).json()["events"]) == 3


def test_idempotency_key(api: Api, admin: dict[str, str]) -> None:
    headers = {**admin, "Idempotency-Key": "order-42"}
    first = api.http.post("/channels/news/events", json={"data": 1}, headers=headers)
    again = api.http.post("/channels/news/events", json={"data": "different"}, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == first.json()
    assert len(_history(api, admin)["events"]) == 1  # type: ignore[arg-type]
    api.http.post("/channels", json={"name": "other"}, headers=admin)
    r = api.http.post("/channels/other/events", json={"data": 1}, headers=headers)
    assert r.status_code == 201  # keys are per channel
    long_key = {**admin, "Idempotency-Key": "k" * 201}
    assert (
        api.http.post("/channels/news/events", json={"data": 1}, headers=long_key).status_code
        == 422
    )
    ok_key = {**admin, "Idempotency-Key": "k" * 200}
    assert (
        api.http.post("/channels/news/events", json={"data": 1}, headers=ok_key).status_code == 201
    )


def test_concurrent_retries_publish_once(api: Api, admin: dict[str, str]) -> None:
    headers = {**admin, "Idempotency-Key": "retry-me"}
    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(
            pool.map(
                lambda _: api.http.post("/channels/news/events", json={"data": 1}, headers=headers),
                range(16),
            )
        )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 15 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(_history(api, admin)["events"]) == 1  # type: ignore[arg-type]


def test_batch_is_ordered_and_atomic(api: Api, admin: dict[str, str]) -> None:
    events = [{"type": f"t{i}", "data": i} for i in range(50)]
    r = api.http.post("/channels/news/events/batch", json={"events": events}, headers=admin)
    assert r.status_code == 201
    got = r.json()["events"]
    assert [e["data"] for e in got] == list(range(50))
    ids = [e["id"] for e in got]
    assert ids == sorted(ids) and len(set(ids)) == 50
    bad = [{"data": 1}, {"type": "ssehub.no", "data": 2}]
    assert (
        api.http.post(
            "/channels/news/events/batch", json={"events": bad}, headers=admin
        ).status_code
        == 422
    )
    assert len(_history(api, admin, "?limit=1000")["events"]) == 50  # type: ignore[arg-type]
    for count in (0, 1001):
        body = {"events": [{"data": 1}] * count}
        assert (
            api.http.post("/channels/news/events/batch", json=body, headers=admin).status_code
            == 422
        )
    body = {"events": [{"data": 1}] * 1000}
    assert api.http.post("/channels/news/events/batch", json=body, headers=admin).status_code == 201
    assert len(_history(api, admin, "?limit=1000")["events"]) == 1000  # type: ignore[arg-type]


def test_history_pages(api: Api, admin: dict[str, str]) -> None:
    r = api.http.post(
        "/channels/news/events/batch",
        json={"events": [{"data": i} for i in range(5)]},
        headers=admin,
    )
    ids = [e["id"] for e in r.json()["events"]]
    page = _history(api, admin, "?limit=2")
    assert [e["id"] for e in page["events"]] == ids[:2] and page["next_after"] == ids[1]  # type: ignore[union-attr]
    page = _history(api, admin, f"?limit=2&after={ids[1]}")
    assert [e["id"] for e in page["events"]] == ids[2:4] and page["next_after"] == ids[3]  # type: ignore[union-attr]
    page = _history(api, admin, f"?limit=2&after={ids[3]}")
    assert [e["id"] for e in page["events"]] == ids[4:] and page["next_after"] is None  # type: ignore[union-attr]
    assert _history(api, admin, f"?after={ids[4]}") == {"events": [], "next_after": None}
    for bad in ("limit=0", "limit=1001", "after=-1", "after=x"):
        assert api.http.get(f"/channels/news/events?{bad}", headers=admin).status_code == 422


def test_history_is_for_readers(api: Api, admin: dict[str, str]) -> None:
    api.http.post("/channels", json={"name": "vip", "private": True}, headers=admin)
    bob = api.user("bob")
    assert api.http.get("/channels/vip/events", headers=bob).status_code == 404
    assert api.http.get("/channels/news/events", headers=bob).status_code == 200


def test_publish_checks_the_caller_and_the_channel(
    api: Api, admin: dict[str, str], database_url: str
) -> None:
    """The publish function checks these inside the writing transaction."""
    bob = api.user("bob")
    one = {"data": 1}
    batch = {"events": [one]}
    assert api.http.post("/channels/news/events", json=one, headers=bob).status_code == 403
    assert api.http.post("/channels/news/events/batch", json=batch, headers=bob).status_code == 403
    r = api.http.post("/channels/nope/events", json=one, headers=admin)
    assert r.status_code == 404 and r.json() == {"detail": "Channel 'nope' not found"}
    # Names no channel can have (a NUL byte cannot even be sent to Postgres) are a 404 too.
    for name in ("%00", "UPPER", "a%20b", "x" * 100):
        for path in (f"/channels/{name}/events", f"/channels/{name}/stream"):
            r = api.http.request(
                "GET" if "stream" in path else "POST", path, json=one, headers=admin
            )
            assert r.status_code == 404, (path, r.status_code, r.text)
    # A deleted user's token is refused, alone in a batch of good publishes.
    admin2 = api.user("chief")
    asyncio.run(sql(database_url, "UPDATE users SET is_admin = true WHERE username = 'chief'"))
    asyncio.run(sql(database_url, "DELETE FROM users WHERE username = 'chief'"))
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda h: api.http.post("/channels/news/events", json=one, headers=h).status_code,
                [admin, admin2] * 8,
            )
        )
    assert results == [201, 401] * 8
    assert len(_history(api, admin)["events"]) == 8  # type: ignore[arg-type]


def test_batch_retry_with_its_idempotency_key_answers_the_first_batch(
    api: Api, admin: dict[str, str], database_url: str
) -> None:
    """A batch answered 503 is retried: with its Idempotency-Key the retry
    publishes nothing and answers 200 with the first batch's events, also once
    retention removed them; a key is one per channel, whichever endpoint used it."""
    keyed = {**admin, "Idempotency-Key": "batch-1"}
    body = {"events": [{"type": f"t{i}", "data": {"i": i}} for i in range(5)]}
    first = api.http.post("/channels/news/events/batch", json=body, headers=keyed)
    assert first.status_code == 201, first.text
    retry = api.http.post("/channels/news/events/batch", json=body, headers=keyed)
    assert retry.status_code == 200 and retry.json() == first.json()
    other = {"events": [{"data": "not the same"}]}
    again = api.http.post("/channels/news/events/batch", json=other, headers=keyed)
    assert again.status_code == 200 and again.json() == first.json()
    with cf.ThreadPoolExecutor(8) as pool:  # retries racing each other: one batch
        racing = list(
            pool.map(
                lambda _: api.http.post(
                    "/channels/news/events/batch",
                    json=body,
                    headers={**admin, "Idempotency-Key": "batch-2"},
                ),
                range(8),
            )
        )
    assert sorted(r.status_code for r in racing) == [200] * 7 + [201]
    assert len({r.text for r in racing}) == 1
    # A single publish under a batch's key answers with the batch's first event,
    # a batch under a single publish's key with that one event.
    single = api.http.post("/channels/news/events", json={"data": 1}, headers=keyed)
    assert single.status_code == 200 and single.json() == first.json()["events"][0]
    one = api.http.post(
        "/channels/news/events", json={"data": 1}, headers={**admin, "Idempotency-Key": "one"}
    )
    as_batch = api.http.post(
        "/channels/news/events/batch", json=body, headers={**admin, "Idempotency-Key": "one"}
    )
    assert as_batch.status_code == 200 and as_batch.json() == {"events": [one.json()]}
    assert len(_history(api, admin, "?limit=1000")["events"]) == 11  # type: ignore[arg-type]
    asyncio.run(sql(database_url, "DELETE FROM events"))  # as retention would
    gone = api.http.post("/channels/news/events/batch", json=body, headers=keyed)
    assert gone.status_code == 200 and gone.json() == first.json()
    for bad, status in (("", 400), ("k" * 201, 422)):
        r = api.http.post(
            "/channels/news/events/batch", json=body, headers={**admin, "Idempotency-Key": bad}
        )
        assert r.status_code == status, (bad, r.text)
    assert _history(api, admin)["events"] == []


def test_batch_events_share_one_publish_time(api: Api, admin: dict[str, str]) -> None:
    body = {"events": [{"data": i} for i in range(20)]}
    got = api.http.post("/channels/news/events/batch", json=body, headers=admin).json()["events"]
    assert len({e["published_at"] for e in got}) == 1 and TIMESTAMP.match(got[0]["published_at"])


def test_publishing_survives_losing_the_writer_connection(
    api: Api, admin: dict[str, str], database_url: str
) -> None:
    """The writer's own connection is killed: the next publishes open a new one."""
    assert (
        api.http.post("/channels/news/events", json={"data": 1}, headers=admin).status_code == 201
    )
    killed = asyncio.run(
        sql(
            database_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'ssehub-writer' AND datname = current_database()",
        )
    )
    assert killed and all(row[0] for row in killed)
    statuses = []
    for i in range(5):
        r = api.http.post("/channels/news/events", json={"data": i}, headers=admin)
        statuses.append(r.status_code)
        if r.status_code != 201:
            # The connection's loss may be seen only by the publish that uses it:
            # that one is a 503 with a retryable answer, never a 500 or a lost event.
            assert r.status_code == 503 and r.json()["detail"]
            time.sleep(0.2)
    assert statuses.count(201) >= 4 and statuses[-1] == 201
    published = [e["data"] for e in _history(api, admin)["events"]]  # type: ignore[union-attr]
    assert published == [1] + [i for i, s in enumerate(statuses) if s == 201]
