"""Stored subscriptions: per user, only for readable channels, gone with the channel.

The basic PUT 201/200, 404 and DELETE cases are in test_channels.test_subscriptions.
"""

from __future__ import annotations

from tests.support import Api


def test_subscriptions_are_per_user_and_need_a_token(api: Api) -> None:
    admin = api.admin()
    api.http.post("/channels", json={"name": "news"}, headers=admin)
    bob, eve = api.user("bob"), api.user("eve")
    assert api.http.put("/me/subscriptions/news", headers=bob).status_code == 201
    assert api.http.get("/me/subscriptions", headers=eve).json() == []
    assert api.http.put("/me/subscriptions/news", headers=eve).status_code == 201
    assert api.http.delete("/me/subscriptions/news", headers=eve).status_code == 204
    assert [s["channel"] for s in api.http.get("/me/subscriptions", headers=bob).json()] == ["news"]
    assert api.http.get("/me/subscriptions").status_code == 401
    assert api.http.put("/me/subscriptions/news").status_code == 401


def test_members_and_admins_may_subscribe_to_private_channels(api: Api) -> None:
    admin = api.admin()
    api.http.post("/channels", json={"name": "vip", "private": True}, headers=admin)
    bob = api.user("bob")
    assert api.http.put("/me/subscriptions/vip", headers=bob).status_code == 404
    assert api.http.put("/channels/vip/members/bob", headers=admin).status_code == 204
    assert api.http.put("/me/subscriptions/vip", headers=bob).status_code == 201
    assert api.http.put("/me/subscriptions/vip", headers=admin).status_code == 201
    api.http.delete("/channels/vip", headers=admin)
    assert api.http.get("/me/subscriptions", headers=bob).json() == []
    assert api.http.get("/me/subscriptions", headers=admin).json() == []
