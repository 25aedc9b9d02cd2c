"""Channels, members and subscriptions: every rule of the contract."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import Api, sql

CHANNEL_FIELDS = {
    "name",
    "description",
    "private",
    "presence",
    "max_events",
    "max_age_seconds",
    "created_at",
    "last_event_id",
}


def _create(api: Api, name: str, **fields: object) -> dict[str, object]:
    r = api.http.post("/channels", json={"name": name, **fields}, headers=api.admin())
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


def test_create_returns_the_channel_object(api: Api) -> None:
    body = _create(api, "news", description="Headlines", max_events=10)
    assert set(body) == CHANNEL_FIELDS
    assert body["name"] == "news" and body["description"] == "Headlines"
    assert body["private"] is False and body["max_events"] == 10
    assert body["presence"] is False
    assert body["max_age_seconds"] is None and body["last_event_id"] is None
    r = api.http.post("/channels", json={"name": "news"}, headers=api.admin())
    assert r.status_code == 409


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "News", "-news", "news-", ".news", "news_", "has space", "a/b", "é"]
)
def test_invalid_names_are_422(api: Api, name: str) -> None:
    assert api.http.post("/channels", json={"name": name}, headers=api.admin()).status_code == 422


@pytest.mark.parametrize("name", ["a", "9", "a.b_c-d", "x" * 64])
def test_valid_names(api: Api, name: str) -> None:
    _create(api, name)


def test_bounds_must_be_positive(api: Api) -> None:
    for field in ("max_events", "max_age_seconds"):
        for value in (0, -1, "many", 2**31, 2**70):
            r = api.http.post("/channels", json={"name": "c", field: value}, headers=api.admin())
            assert r.status_code == 422
            r = api.http.patch("/channels/c", json={field: 2**31}, headers=api.admin())
            assert r.status_code in (404, 422)
    _create(api, "c", max_events=2**31 - 1, max_age_seconds=2**31 - 1)
    for field in ("max_events", "max_age_seconds"):
        r = api.http.patch("/channels/c", json={field: 2**31}, headers=api.admin())
        assert r.status_code == 422


def test_admin_only_operations(api: Api) -> None:
    _create(api, "news")
    bob = api.user("bob")
    assert api.http.post("/channels", json={"name": "mine"}, headers=bob).status_code == 403
    assert (
        api.http.patch("/channels/news", json={"description": "x"}, headers=bob).status_code == 403
    )
    assert api.http.delete("/channels/news", headers=bob).status_code == 403
    assert api.http.put("/channels/news/members/bob", headers=bob).status_code == 403
    assert api.http.get("/channels/news/members", headers=bob).status_code == 403
    r = api.http.post("/channels/news/events", json={"data": 1}, headers=bob)
    assert r.status_code == 403
    assert api.http.get("/channels").status_code == 401


def test_private_channels_are_invisible_to_non_members(api: Api) -> None:
    _create(api, "public")
    _create(api, "secret", private=True)
    bob = api.user("bob")
    assert api.http.get("/channels/secret", headers=bob).status_code == 404
    assert api.http.get("/channels/missing", headers=bob).json() == {
        "detail": "Channel 'missing' not found"
    }
    assert [c["name"] for c in api.http.get("/channels", headers=bob).json()] == ["public"]
    assert api.http.put("/channels/secret/members/bob", headers=api.admin()).status_code == 204
    assert api.http.get("/channels/secret", headers=bob).status_code == 200
    assert [c["name"] for c in api.http.get("/channels", headers=bob).json()] == [
        "public",
        "secret",
    ]
    members = api.http.get("/channels/secret/members", headers=api.admin()).json()
    assert [m["username"] for m in members] == ["bob"]
    assert api.http.delete("/channels/secret/members/bob", headers=api.admin()).status_code == 204
    assert api.http.get("/channels/secret", headers=bob).status_code == 404
    assert api.http.put("/channels/secret/members/ghost", headers=api.admin()).status_code == 404
    assert api.http.put("/channels/nope/members/bob", headers=api.admin()).status_code == 404
    # Admins see everything.
    assert len(api.http.get("/channels", headers=api.admin()).json()) == 2


def test_list_pages_in_name_order(api: Api) -> None:
    for name in ("c", "a", "e", "b", "d"):
        _create(api, name)
    admin = api.admin()
    page = api.http.get("/channels?limit=2", headers=admin).json()
    assert [c["name"] for c in page] == ["a", "b"]
    page = api.http.get("/channels?limit=2&after=b", headers=admin).json()
    assert [c["name"] for c in page] == ["c", "d"]
    page = api.http.get("/channels?after=d", headers=admin).json()
    assert [c["name"] for c in page] == ["e"]
    for bad in ("0", "1001", "x"):
        assert api.http.get(f"/channels?limit={bad}", headers=admin).status_code == 422
    assert api.http.get("/channels?limit=1000", headers=admin).status_code == 200


def test_patch_and_delete(api: Api, database_url: str) -> None:
    _create(api, "news", max_events=5)
    admin = api.admin()
    r = api.http.patch(
        "/channels/news",
        json={"description": "d", "max_events": None, "private": True},
        headers=admin,
    )
    assert r.status_code == 200
    assert r.json()["max_events"] is None and r.json()["private"] is True
    assert r.json()["description"] == "d"
    assert api.http.patch("/channels/news", json={"name": "x"}, headers=admin).status_code == 422
    assert api.http.patch("/channels/nope", json={}, headers=admin).status_code == 404
    bob = api.user("bob")
    api.http.put("/channels/news/members/bob", headers=admin)
    api.http.put("/me/subscriptions/news", headers=bob)
    api.http.post("/channels/news/events", json={"data": 1}, headers=admin)
    assert api.http.get("/channels/news", headers=admin).json()["last_event_id"] is not None
    assert api.http.delete("/channels/news", headers=admin).status_code == 204
    assert api.http.get("/channels/news", headers=admin).status_code == 404
    assert api.http.delete("/channels/news", headers=admin).status_code == 404
    for table in ("events", "channel_members", "subscriptions"):
        assert asyncio.run(sql(database_url, f"SELECT count(*) FROM {table}"))[0][0] == 0


def test_subscriptions(api: Api) -> None:
    _create(api, "a")
    _create(api, "b")
    _create(api, "vip", private=True)
    bob = api.user("bob")
    assert api.http.put("/me/subscriptions/a", headers=bob).status_code == 201
    r = api.http.put("/me/subscriptions/a", headers=bob)
    assert r.status_code == 200 and r.json()["channel"] == "a"
    assert api.http.put("/me/subscriptions/b", headers=bob).status_code == 201
    assert api.http.put("/me/subscriptions/vip", headers=bob).status_code == 404
    assert api.http.put("/me/subscriptions/none", headers=bob).status_code == 404
    subs = api.http.get("/me/subscriptions", headers=bob).json()
    assert [s["channel"] for s in subs] == ["a", "b"]
    assert set(subs[0]) == {"channel", "created_at"}
    assert api.http.delete("/me/subscriptions/a", headers=bob).status_code == 204
    assert api.http.delete("/me/subscriptions/a", headers=bob).status_code == 204
    api.http.delete("/channels/b", headers=api.admin())
    assert api.http.get("/me/subscriptions", headers=bob).json() == []


def test_last_event_id_follows_publishes(api: Api) -> None:
    _create(api, "news")
    admin = api.admin()
    first = api.http.post("/channels/news/events", json={"data": 1}, headers=admin).json()
    assert api.http.get("/channels/news", headers=admin).json()["last_event_id"] == first["id"]
    batch = api.http.post(
        "/channels/news/events/batch", json={"events": [{"data": 2}, {"data": 3}]}, headers=admin
    ).json()["events"]
    listed = api.http.get("/channels", headers=admin).json()
    assert listed[0]["last_event_id"] == batch[-1]["id"]


def test_member_routes_need_a_token_and_an_admin(api: Api) -> None:
    _create(api, "secret", private=True)
    bob = api.user("bob")
    assert api.http.delete("/channels/secret/members/bob", headers=bob).status_code == 403
    assert api.http.post("/channels", json={"name": "x"}).status_code == 401
    assert api.http.put("/channels/secret/members/bob").status_code == 401
    assert api.http.get("/channels/secret/members", headers=api.admin()).json() == []
    assert api.http.get("/channels/nope/members", headers=api.admin()).status_code == 404
