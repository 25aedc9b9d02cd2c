"""Every auth path of the contract, in process (the admin bootstrap, which
needs starting servers, is in tests/test_admin_bootstrap.py)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import json
import time
import warnings

import jwt
import pytest

from tests.support import TEST_SECRET, Api, auth, sql
from tests.support.inprocess import in_process


def _token(claims: dict[str, object], key: str = TEST_SECRET, alg: str = "HS256") -> str:
    with warnings.catch_warnings():  # HS512 with our 56-byte test key: forged on purpose
        warnings.simplefilter("ignore")
        return jwt.encode(claims, key, algorithm=alg)


def _claims(user_id: int, **over: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": str(user_id), "iat": now, "exp": now + 60, "scope": "access", **over}


def _b64(part: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


def test_register_returns_the_user(api: Api) -> None:
    r = api.register("alice")
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"id", "username", "is_admin", "created_at"}
    assert body["username"] == "alice" and body["is_admin"] is False


def test_duplicate_username_is_409_even_when_racing(api: Api) -> None:
    with cf.ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(lambda _: api.register("racer").status_code, range(6)))
    assert codes == [201, 409, 409, 409, 409, 409]
    assert api.register("racer").json()["detail"]


@pytest.mark.parametrize(
    "username", ["ab", "a" * 65, "has space", "at@sign", "ümlaut", "", "alice\n", "nul\x00byte"]
)
def test_invalid_usernames_are_422(api: Api, username: str) -> None:
    assert api.register(username).status_code == 422


@pytest.mark.parametrize("password", ["x" * 7, "x" * 257])
def test_invalid_passwords_are_422(api: Api, password: str) -> None:
    assert api.register("bob", password).status_code == 422


def test_valid_edge_cases_register(api: Api) -> None:
    assert api.register("a.b-c_D9").status_code == 201
    assert api.register("x" * 64, "p" * 256).status_code == 201
    assert api.register("eight", "12345678").status_code == 201


def test_malformed_bodies_are_400_or_422_never_500(api: Api) -> None:
    r = api.http.post(
        "/auth/register", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "detail" in r.json()
    r = api.http.post(
        "/auth/register", content=b"\xff\xfe", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert api.http.post("/auth/register", json=["alice", "pw"]).status_code == 422
    assert api.http.post("/auth/register", json={"username": "alice"}).status_code == 422
    big = {"username": "alice", "password": "p" * 5_000_000}
    assert api.http.post("/auth/register", json=big).status_code in (413, 422)
    # The token endpoint takes a form; JSON is a clear 422.
    assert api.http.post("/auth/token", json={"username": "a", "password": "b"}).status_code == 422


def test_registration_closed_is_403(database_url: str) -> None:
    with in_process(database_url, SSEHUB_REGISTRATION_OPEN="false") as api:
        r = api.register("alice")
    assert r.status_code == 403 and r.json()["detail"]


def test_token_and_me(api: Api) -> None:
    api.register("alice")
    r = api.http.post("/auth/token", data={"username": "alice", "password": "password-123"})
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    me = api.http.get("/users/me", headers=auth(body["access_token"])).json()
    assert me["username"] == "alice" and set(me) == {"id", "username", "is_admin", "created_at"}


def test_wrong_password_and_unknown_user_look_the_same(api: Api) -> None:
    api.register("alice")
    wrong = api.http.post("/auth/token", data={"username": "alice", "password": "nope-nope"})
    unknown = api.http.post("/auth/token", data={"username": "ghost", "password": "nope-nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.headers["www-authenticate"] == unknown.headers["www-authenticate"] == "Bearer"


def test_stream_token(api: Api) -> None:
    headers = api.user("alice")
    r = api.http.post("/auth/stream-token", headers=headers)
    assert r.status_code == 200
    assert set(r.json()) == {"stream_token", "expires_in"}
    claims = jwt.decode(r.json()["stream_token"], TEST_SECRET, algorithms=["HS256"])
    assert claims["scope"] == "stream"


def _user_id(api: Api, name: str = "alice") -> int:
    headers = api.user(name)
    user_id: int = api.http.get("/users/me", headers=headers).json()["id"]
    return user_id


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda uid: _token(_claims(uid, exp=int(time.time()) - 5)), id="expired"),
        pytest.param(lambda uid: _token(_claims(uid), key="another-key-" * 4), id="wrong-key"),
        pytest.param(
            lambda uid: f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(uid))}.",
            id="alg-none",
        ),
        pytest.param(lambda uid: _token(_claims(uid), alg="HS512"), id="hs512"),
        pytest.param(
            lambda uid: _token({k: v for k, v in _claims(uid).items() if k != "scope"}),
            id="no-scope",
        ),
        pytest.param(
            lambda uid: _token({k: v for k, v in _claims(uid).items() if k != "exp"}), id="no-exp"
        ),
        pytest.param(lambda uid: _token(_claims(uid, sub="not-a-number")), id="bad-sub"),
        pytest.param(
            lambda uid: _token({k: v for k, v in _claims(uid).items() if k != "sub"}), id="no-sub"
        ),
        pytest.param(
            lambda uid: _token({k: v for k, v in _claims(uid).items() if k != "iat"}), id="no-iat"
        ),
        pytest.param(lambda uid: _token(_claims(uid, sub=uid)), id="int-sub"),
        pytest.param(lambda uid: _token(_claims(uid + 1000)), id="no-such-user"),
        pytest.param(lambda uid: "garbage", id="garbage"),
        pytest.param(lambda uid: _token(_claims(uid, scope="admin")), id="unknown-scope"),
        # Claims only a key holder could sign, but still a 401 and never a 500.
        pytest.param(lambda uid: _token(_claims(uid, sub=str(2**63))), id="sub-beyond-bigint"),
        pytest.param(lambda uid: _token(_claims(uid, sub="9" * 40)), id="sub-huge"),
        pytest.param(lambda uid: _token(_claims(uid, sub=f" {uid}")), id="sub-padded"),
        pytest.param(lambda uid: _token(_claims(uid, scope=["access"])), id="scope-list"),
        pytest.param(lambda uid: _token(_claims(uid, scope={"a": 1})), id="scope-object"),
        pytest.param(lambda uid: _token(_claims(uid, scope=None)), id="scope-null"),
    ],
)
def test_bad_tokens_are_401(api: Api, make) -> None:  # type: ignore[no-untyped-def]
    token = make(_user_id(api))
    for path in ("/users/me", "/stream"):  # REST and stream endpoints decode alike
        r = api.http.get(path, headers=auth(token))
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "detail" in r.json()


def test_a_good_forged_token_works(api: Api) -> None:
    """The positive control for the cases above: the same forging, done right."""
    token = _token(_claims(_user_id(api)))
    assert api.http.get("/users/me", headers=auth(token)).status_code == 200


def test_missing_token_is_401(api: Api) -> None:
    r = api.http.get("/users/me")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_deleted_users_token_is_401(api: Api, database_url: str) -> None:
    headers = api.user("alice")
    asyncio.run(sql(database_url, "DELETE FROM users WHERE username = 'alice'"))
    for r in (
        api.http.get("/users/me", headers=headers),
        api.http.post("/auth/stream-token", headers=headers),
    ):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "username", ["nul\x00byte", "x" * 1000, "ümlaut", "'; DROP TABLE users; --"]
)
def test_impossible_usernames_at_login_are_the_ordinary_401(api: Api, username: str) -> None:
    """Postgres cannot even compare a NUL byte: such a name must not reach a query."""
    r = api.http.post("/auth/token", data={"username": username, "password": "password-123"})
    assert r.status_code == 401 and r.json() == {"detail": "Incorrect username or password"}


def test_a_registered_user_can_log_in_at_once(api: Api) -> None:
    """The registration is committed before its 201 leaves, so the next request sees it."""
    for i in range(5):
        assert api.register(f"quick{i}").status_code == 201
        assert api.login(f"quick{i}")


def test_stream_token_is_refused_by_rest_endpoints(api: Api) -> None:
    admin = api.admin()
    stream_token = api.http.post("/auth/stream-token", headers=admin).json()["stream_token"]
    for method, path in (
        ("GET", "/users/me"),
        ("POST", "/auth/stream-token"),
        ("GET", "/channels"),
        ("GET", "/me/subscriptions"),
    ):
        r = api.http.request(method, path, headers=auth(stream_token))
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
    r = api.http.post("/channels", json={"name": "x"}, headers=auth(stream_token))
    assert r.status_code == 401
    # The same user's access token is fine: it is the scope that is refused.
    assert api.http.get("/users/me", headers=admin).status_code == 200


def test_a_stream_token_opens_no_secured_endpoint(api: Api, database_url: str) -> None:
    """Every operation /docs marks as secured refuses a stream token, and changes nothing.

    Read from the live OpenAPI schema, so an endpoint added later is covered too.
    """
    admin = api.admin()
    assert api.http.post("/channels", json={"name": "news"}, headers=admin).status_code == 201
    token = api.http.post("/auth/stream-token", headers=admin).json()["stream_token"]
    schema = api.http.get("/openapi.json").json()
    # The two stream endpoints accept stream tokens: that is what they are for.
    streams = {"/stream", "/channels/{name}/stream"}
    secured = [
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if "security" in operation and path not in streams
    ]
    assert {("GET", "/users/me"), ("POST", "/channels/{name}/events")} <= set(secured)
    for method, path in secured:
        url = path.replace("{name}", "news").replace("{username}", "admin")
        url = url.replace("{key_id}", "1")
        body = {} if method in ("POST", "PUT", "PATCH") else None
        r = api.http.request(method, url, json=body, headers=auth(token))
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    rows = asyncio.run(sql(database_url, "SELECT name FROM channels WHERE owner_id IS NULL"))
    assert [r[0] for r in rows] == ["news"]
    assert asyncio.run(sql(database_url, "SELECT 1 FROM events")) == []


def test_token_lifetimes_follow_the_settings(database_url: str) -> None:
    settings = {"SSEHUB_ACCESS_TOKEN_TTL_SECONDS": "60", "SSEHUB_STREAM_TOKEN_TTL_SECONDS": "30"}
    with in_process(database_url, **settings) as api:
        _token_lifetimes_are(api, access=60, stream=30)


def _token_lifetimes_are(api: Api, access: int, stream: int) -> None:
    api.register("alice")
    r = api.http.post("/auth/token", data={"username": "alice", "password": "password-123"})
    issued = r.json()
    assert issued["expires_in"] == access
    claims = jwt.decode(issued["access_token"], TEST_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == access and claims["scope"] == "access"
    streaming = api.http.post("/auth/stream-token", headers=auth(issued["access_token"])).json()
    assert streaming["expires_in"] == stream
    claims = jwt.decode(streaming["stream_token"], TEST_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == stream and claims["scope"] == "stream"


def test_a_stream_token_or_cookie_never_outlives_the_token_that_obtained_it(api: Api) -> None:
    """An access token with 4 s left must not buy a stream token (or cookie) for
    an hour: both end when it does, and are refused from then on."""
    user_id = _user_id(api)
    expires = int(time.time()) + 4
    short = _token(_claims(user_id, exp=expires))
    r = api.http.post("/auth/stream-token", headers=auth(short))
    assert r.status_code == 200, r.text
    assert 0 <= r.json()["expires_in"] <= 4, r.json()
    stream_token = r.json()["stream_token"]
    claims = jwt.decode(stream_token, TEST_SECRET, algorithms=["HS256"])
    assert claims["exp"] <= expires, (claims, expires)
    r = api.http.post("/auth/stream-cookie", headers=auth(short))
    assert r.status_code == 204, r.text
    cookie = r.cookies["ssehub_stream"]
    assert jwt.decode(cookie, TEST_SECRET, algorithms=["HS256"])["exp"] <= expires
    max_age = int(r.headers["set-cookie"].split("Max-Age=")[1].split(";")[0])
    assert 0 <= max_age <= 4, r.headers["set-cookie"]
    while time.time() < expires + 1:
        time.sleep(0.1)
    for r in (
        api.http.get("/stream", params={"access_token": stream_token}),
        api.http.get("/stream", headers={"Cookie": f"ssehub_stream={cookie}"}),
    ):
        assert r.status_code == 401, (r.status_code, r.text)
    # A token with its full lifetime ahead still gets the configured one.
    r = api.http.post("/auth/stream-token", headers=auth(api.login("alice")))
    assert 3590 <= r.json()["expires_in"] <= 3600, r.json()
