from tests.support import Api


def test_register_login_me(api: Api) -> None:
    headers = api.user("alice")
    r = api.http.get("/users/me", headers=headers)
    assert r.status_code == 200
    assert r.json()["username"] == "alice"
    assert api.http.get("/users/me", headers=api.admin()).json()["is_admin"] is True
