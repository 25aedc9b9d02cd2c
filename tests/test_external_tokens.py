"""Your application's own tokens (``SSEHUB_JWT_*``), against real servers.

The identity provider is played by ``tests.support.idp.Idp`` (RSA 2048, EC
P-256 and Ed25519 keys, a JWKS served over HTTP that a test can change). ssehub runs as ``ssehub serve``
subprocesses on a real Postgres.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import hmac
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest

from app.auth.external import username_for
from app.auth.jwks import REFETCH_SECONDS
from tests.support import ROOT, TEST_SECRET, Api, Server, auth, free_port, sql, wait_until
from tests.support.idp import (
    ALGORITHMS,
    AUDIENCE,
    ISSUER,
    Idp,
    b64json,
    b64url,
    claims,
    jwks_env,
    new_key,
    public_pem,
)
from tests.support.sse import SseStream

ADMIN_ROLE = "ssehub:admin"
OCT_SECRET = secrets.token_bytes(32)


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    provider = Idp()
    for kind in ALGORITHMS:
        provider.add(kind, kid=kind)
    # A symmetric key in the set must verify nothing: the set is public.
    provider.extra.append({"kty": "oct", "kid": "oct", "k": b64url(OCT_SECRET), "alg": "HS256"})
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def hub(idp: Idp, database_url: str) -> Iterator[Server]:
    """One server that trusts ``idp``, for the tests that need nothing else."""
    srv = Server(database_url, env=jwks_env(idp.url)).start()
    try:
        yield srv
    finally:
        srv.stop()


@dataclass
class Rotating:
    """A provider and a server that trusts it, whose JWKS was first fetched at ``fetched``."""

    idp: Idp
    api: Api
    fetched: float


@pytest.fixture(scope="module")
def rotating(database_url: str) -> Iterator[Rotating]:
    """The 30 s cooldown of the JWKS refetch runs from its first fetch, made here:
    the first test of the module asks for this, the last waits for the end of the
    cooldown, and the tests between them fill the wait."""
    provider = Idp()
    provider.add("rsa", kid="old")
    srv = Server(database_url, env=jwks_env(provider.url)).start()
    try:
        api = Api(srv.url)
        assert provider.hits == 0  # fetched on first use, not at start
        assert me(api, provider.token("old", sub="first-user")).status_code == 200
        yield Rotating(provider, api, time.monotonic())
        api.http.close()
    finally:
        srv.stop()
        provider.stop()


@pytest.fixture(scope="module")
def souring(database_url: str) -> Iterator[Rotating]:
    """A provider whose JWKS is fetched once here and fails later: like ``rotating``,
    made by the first test and used by one near the end, 30 s later."""
    provider = Idp()
    provider.add("rsa", kid="known")
    srv = Server(database_url, env=jwks_env(provider.url)).start()
    try:
        api = Api(srv.url)
        assert me(api, provider.token("known", sub="souring-user")).status_code == 200
        yield Rotating(provider, api, time.monotonic())
        api.http.close()
    finally:
        provider.status = 200
        provider.delay = 0.0
        srv.stop()
        provider.stop()


@pytest.fixture
def client(hub: Server) -> Iterator[Api]:
    c = Api(hub.url)
    yield c
    c.http.close()


def me(api: Api, token: str) -> httpx.Response:
    return api.http.get("/users/me", headers=auth(token))


def assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers["www-authenticate"] == "Bearer"


# -- the JWKS: fetched once, refetched for an unknown kid at most every 30 s ------


def test_unknown_kids_do_not_refetch_the_jwks_within_30_s(
    rotating: Rotating, souring: Rotating
) -> None:
    """First in the module: see ``rotating`` (and ``souring``), and the last test
    for the rotation."""
    idp, api = rotating.idp, rotating.api
    assert souring.idp.hits == 1
    assert idp.hits == 1
    stranger = idp.add("ec", publish=False)
    for _ in range(5):
        assert_401(me(api, idp.token(stranger)))
    # The provider rotates: a new key, published, signs at once.
    if "new" not in idp.keys:
        idp.add("ed25519", kid="new")
    if time.monotonic() - rotating.fetched < 25:  # still cooling down: no fetch yet
        assert_401(me(api, idp.token("new", sub="rotated")))
    assert idp.hits == 1, "an unknown kid refetched the JWKS within 30 s of a fetch"
    assert me(api, idp.token("old", sub="first-user")).status_code == 200


# -- accepted tokens and the users they make -----------------------------------


@pytest.mark.parametrize("kind", list(ALGORITHMS))
def test_rs256_es256_and_eddsa_tokens_make_a_user_without_a_password(
    client: Api, idp: Idp, database_url: str, kind: str
) -> None:
    sub = f"user-{kind}"
    r = me(client, idp.token(kind, sub=sub))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["username"] == username_for(sub) and body["is_admin"] is False
    # The same user on the next token, not a second one.
    assert me(client, idp.token(kind, sub=sub)).json()["id"] == body["id"]
    rows = asyncio.run(
        sql(
            database_url,
            "SELECT password_hash, external_subject FROM users WHERE username = $1",
            username_for(sub),
        )
    )
    assert [tuple(r) for r in rows] == [(None, sub)]
    # No password: no password logs them in, not even an empty one.
    for password in ("", "password-123", "None"):
        login = client.http.post(
            "/auth/token", data={"username": username_for(sub), "password": password}
        )
        assert login.status_code in (401, 422), login.text


def test_first_uses_racing_make_one_user_and_one_personal_channel(
    client: Api, idp: Idp, database_url: str
) -> None:
    tokens = [idp.token("rsa", sub="auth0|racer") for _ in range(8)]
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda t: me(Api(client.base_url), t), tokens))
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    name = username_for("auth0|racer")
    rows = asyncio.run(
        sql(database_url, "SELECT count(*) FROM channels WHERE name = $1", f"@{name}")
    )
    assert rows[0][0] == 1


def _none_token(kid: str) -> str:
    return f"{b64json({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{b64json(claims())}."


def _confused_token(idp: Idp) -> str:
    """HS256 "signed" with the RSA public key's PEM as the HMAC secret, with the
    RSA key's kid: what a verifier that lets the token pick the algorithm accepts."""
    header = b64json({"alg": "HS256", "typ": "JWT", "kid": "rsa"})
    payload = b64json(claims())
    secret = public_pem(idp.keys["rsa"][1])
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(mac)}"


def _forged_with_known_kid(_idp: Idp) -> str:
    """Signed by another RSA key, under the kid of the published one."""
    other = new_key("rsa")
    return jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "rsa"})


REFUSED: dict[str, Callable[[Idp], str]] = {
    "wrong-iss": lambda idp: idp.token("rsa", iss="https://evil.example.test/"),
    "no-iss": lambda idp: idp.token("rsa", iss=None),
    "wrong-aud": lambda idp: idp.token("ec", aud="another-service"),
    "no-aud": lambda idp: idp.token("ec", aud=None),
    "expired": lambda idp: idp.token("ed25519", exp=int(time.time()) - 60),
    "nbf-beyond-leeway": lambda idp: idp.token("rsa", nbf=int(time.time()) + 120),
    "iat-beyond-leeway": lambda idp: idp.token("rsa", iat=int(time.time()) + 120),
    "no-exp": lambda idp: idp.token("ec", exp=None),
    "alg-none": lambda _idp: _none_token("rsa"),
    "alg-confusion": _confused_token,
    "bad-signature": _forged_with_known_kid,
    "jwks-oct-key": lambda _idp: jwt.encode(
        claims(), OCT_SECRET, algorithm="HS256", headers={"kid": "oct"}
    ),
    "unknown-kid": lambda idp: idp.token(idp.add("rsa", publish=False)),
    "no-kid": lambda idp: jwt.encode(claims(), idp.keys["ec"][1], algorithm="ES256"),
    "empty-sub": lambda idp: idp.token("rsa", sub=""),
    "garbage": lambda _idp: "not.a.jwt",
}


def test_bad_tokens_are_401(client: Api, idp: Idp, database_url: str) -> None:
    """Every case in one test: each costs a request, while a test's set-up costs a second."""
    for case, make in REFUSED.items():
        token = make(idp)
        r = me(client, token)
        assert r.status_code == 401, (case, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer", case
        # ...on the publish path too, which skips FastAPI (app.hotpaths).
        r = client.http.post(
            "/channels/any/events", json={"type": "t", "data": 1}, headers=auth(token)
        )
        assert r.status_code == 401, (case, r.status_code, r.text)
    rows = asyncio.run(sql(database_url, "SELECT 1 FROM users WHERE external_subject IS NOT NULL"))
    assert rows == [], "a refused token created a user"


def test_leeway_of_30_seconds_and_audience_lists(client: Api, idp: Idp) -> None:
    now = int(time.time())
    assert me(client, idp.token("rsa", sub="early", nbf=now + 10)).status_code == 200
    assert me(client, idp.token("rsa", sub="late", exp=now - 10)).status_code == 200
    assert me(client, idp.token("rsa", sub="skewed", iat=now + 10)).status_code == 200
    aud = [AUDIENCE, "another-service"]
    assert me(client, idp.token("ec", sub="many-auds", aud=aud)).status_code == 200


def test_the_admin_claim_promotes_and_a_later_token_demotes(client: Api, idp: Idp) -> None:
    admin = idp.token("ec", sub="ops", roles=["reader", ADMIN_ROLE])
    assert me(client, admin).json()["is_admin"] is True
    r = client.http.post("/channels", json={"name": "ops-made"}, headers=auth(admin))
    assert r.status_code == 201, r.text
    r = client.http.post(
        "/channels/ops-made/events", json={"type": "t", "data": 1}, headers=auth(admin)
    )
    assert r.status_code == 201, r.text

    plain = idp.token("ec", sub="ops", roles=["reader"])
    assert me(client, plain).json()["is_admin"] is False
    r = client.http.post("/channels", json={"name": "ops-again"}, headers=auth(plain))
    assert r.status_code == 403
    # The demotion is the account's, not the token's: publishing with either is
    # refused once the instance has heard of it (within a second).
    wait_until(
        lambda: (
            client.http.post(
                "/channels/ops-made/events", json={"type": "t", "data": 1}, headers=auth(plain)
            ).status_code
            == 403
        ),
        "the demotion heard",
        timeout=2,
    )
    # A role that only looks like the admin value is not it.
    assert (
        me(client, idp.token("ec", sub="ops", roles=[ADMIN_ROLE + "x"])).json()["is_admin"] is False
    )


# -- usernames ---------------------------------------------------------------------


def test_subjects_that_are_not_usernames_get_a_stable_distinct_username(
    client: Api, idp: Idp
) -> None:
    subjects = ["auth0|123", "alice@example.com", "auth0_123", "auth0?123", "x" * 200, "ab"]
    names = {}
    for sub in subjects:
        r = me(client, idp.token("rsa", sub=sub))
        assert r.status_code == 200, (sub, r.text)
        names[sub] = r.json()["username"]
        assert names[sub] == username_for(sub)
        assert re.fullmatch(r"[A-Za-z0-9_.\-]{3,64}", names[sub]), names[sub]
        # Same claim, same user.
        assert me(client, idp.token("ed25519", sub=sub)).json()["username"] == names[sub]
    assert len(set(names.values())) == len(subjects), names
    assert re.fullmatch(r"auth0_123-[0-9a-f]{8}", names["auth0|123"])
    # A subject that is a valid username gets the suffix too: no one can register it.
    assert re.fullmatch(r"auth0_123-[0-9a-f]{8}", names["auth0_123"])
    assert names["auth0_123"] != names["auth0|123"]


def test_a_subject_never_takes_over_a_registered_users_account(
    client: Api, idp: Idp, database_url: str
) -> None:
    local = client.user("carol")
    carol = client.http.get("/users/me", headers=local).json()
    # The subject "carol" is another user, with a name of its own.
    r = me(client, idp.token("rsa", sub="carol", roles=[ADMIN_ROLE]))
    assert r.status_code == 200, r.text
    assert r.json()["id"] != carol["id"] and r.json()["username"] == username_for("carol")
    # A local account that holds a derived name (one registered before registration
    # refused them) is refused to the subject, never shared.
    taken = username_for("auth0|999")
    asyncio.run(sql(database_url, "INSERT INTO users (username) VALUES ($1)", taken))
    assert_401(me(client, idp.token("rsa", sub="auth0|999", roles=[ADMIN_ROLE])))
    # The local user is untouched and still logs in, no admin.
    assert client.http.get("/users/me", headers=local).json() == carol
    assert client.login("carol")


def test_registering_an_external_users_name_first_is_refused(client: Api, idp: Idp) -> None:
    """The squatter knows the subject ("dave", "auth0|dave") and registers the
    name it maps to before dave's first token: refused, so dave is not locked out."""
    for sub in ("dave", "auth0|dave"):
        name = username_for(sub)
        r = client.register(name)
        assert r.status_code == 422, (sub, r.status_code, r.text)
        assert "identity provider" in r.text, r.text
        r = me(client, idp.token("rsa", sub=sub))
        assert r.status_code == 200, (sub, r.text)
        assert r.json()["username"] == name
    # Upper-case hex is the same form: refused too. Names merely like it register.
    assert client.register(username_for("dave").upper()).status_code == 422
    for fine in ("dave-1234567", "dave-12345678x", "dave_12345678", "dave-1234567g"):
        assert client.register(fine).status_code == 201, fine


def test_unstorable_or_overlong_subjects_are_401_not_500(
    client: Api, idp: Idp, database_url: str
) -> None:
    for sub in ("\ud800", "a\udfffb", "nul\x00sub", "x" * 256, "y" * 3000):
        r = me(client, idp.token("rsa", sub=sub))
        assert r.status_code == 401, (sub[:20], r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    rows = asyncio.run(sql(database_url, "SELECT 1 FROM users WHERE external_subject IS NOT NULL"))
    assert rows == [], "an unstorable subject made a user"
    # 255 characters is still a subject.
    r = me(client, idp.token("rsa", sub="z" * 255))
    assert r.status_code == 200, r.text


def test_a_deleted_external_user_stays_deleted_for_tokens_issued_before(
    client: Api, idp: Idp
) -> None:
    sub = "auth0|gone"
    name = username_for(sub)
    used = idp.token("rsa", sub=sub)
    unused = idp.token("ec", sub=sub)  # issued before the deletion, never shown yet
    first = me(client, used).json()["id"]
    r = client.http.delete(f"/users/{name}", headers=client.admin())
    assert r.status_code == 204
    deleted_at = time.time()
    assert_401(me(client, used))
    assert_401(me(client, unused))
    # A token issued after the deletion makes the user anew: more than the 30 s of
    # leeway after it (iat has whole seconds; iat up to 30 s ahead is accepted). A
    # sleep to the next whole second: nothing but the clock says "after".
    time.sleep(max(0.0, int(deleted_at) + 1 - time.time()))
    fresh = idp.token("rsa", sub=sub, iat=int(time.time()) + 30)
    r = me(client, fresh)
    assert r.status_code == 200, r.text
    assert r.json()["username"] == name and r.json()["id"] != first
    # The tokens issued before the deletion do not come back with the new account.
    assert_401(me(client, used))
    assert_401(me(client, unused))
    assert me(client, fresh).status_code == 200


def test_a_deleted_users_old_tokens_do_not_come_back_with_the_idps_clock_ahead(
    client: Api, idp: Idp
) -> None:
    """The identity provider's clock runs 10 s ahead (within the 30 s of leeway): a
    token it issued just before the deletion says it was issued after it."""
    sub = "auth0|skewed"
    assert me(client, idp.token("rsa", sub=sub)).status_code == 200
    r = client.http.delete(f"/users/{username_for(sub)}", headers=client.admin())
    assert r.status_code == 204
    deleted_at = time.time()
    for ahead in (2, 10, 29):
        issued_before = idp.token("rsa", sub=sub, iat=int(deleted_at) + ahead)
        assert_401(me(client, issued_before))


def test_a_stream_token_from_an_external_token_ends_with_it(
    client: Api, idp: Idp, hub: Server
) -> None:
    """A token with 4 s left obtains a stream token and a cookie: both end with it."""
    expires = int(time.time()) + 4
    token = idp.token("rsa", sub="short-lived", exp=expires)
    r = client.http.post("/auth/stream-token", headers=auth(token))
    assert r.status_code == 200, r.text
    assert r.json()["expires_in"] <= 4, r.json()
    stream_token = r.json()["stream_token"]
    assert jwt.decode(stream_token, options={"verify_signature": False})["exp"] <= expires
    r = client.http.post("/auth/stream-cookie", headers=auth(token))
    assert r.status_code == 204, r.text
    cookie = r.cookies["ssehub_stream"]
    assert jwt.decode(cookie, options={"verify_signature": False})["exp"] <= expires
    assert int(re.search(r"Max-Age=(\d+)", r.headers["set-cookie"])[1]) <= 4  # type: ignore[index]
    # A sleep past the external token's exp: both must be refused once it has
    # passed, and only the clock says when that is.
    time.sleep(max(0.0, expires + 1 - time.time()))
    r = client.http.get("/stream", params={"access_token": stream_token})
    assert_401(r)
    r = client.http.get("/stream", headers={"Cookie": f"ssehub_stream={cookie}"})
    assert_401(r)


# -- what an external user can do ------------------------------------------------


def test_an_external_user_streams_and_gets_their_personal_channel(
    client: Api, idp: Idp, hub: Server
) -> None:
    sub = "auth0|streamer"
    name = username_for(sub)
    token = idp.token("ed25519", sub=sub)
    admin = client.admin()
    assert (
        client.http.post("/channels", json={"name": "ext-news"}, headers=admin).status_code == 201
    )
    assert client.http.put("/me/subscriptions/ext-news", headers=auth(token)).status_code == 201
    r = client.http.post("/auth/stream-token", headers=auth(token))
    assert r.status_code == 200, r.text
    stream_token = r.json()["stream_token"]
    own = SseStream(f"{hub.url}/stream?access_token={stream_token}")
    direct = SseStream(f"{hub.url}/stream?access_token={token}")  # the IdP's token itself
    try:
        assert own.status == direct.status == 200
        r = client.http.post(
            f"/users/{name}/events", json={"type": "dm", "data": "hi"}, headers=admin
        )
        assert r.status_code == 201, r.text
        assert r.json()["channel"] == f"@{name}"
        news = client.http.post(
            "/channels/ext-news/events", json={"type": "t", "data": 2}, headers=admin
        ).json()["id"]
        for stream in (own, direct):
            stream.wait_ids(2)
            got = {f.json["channel"]: f.id for f in stream.events()}
            assert got == {f"@{name}": r.json()["id"], "ext-news": news}
    finally:
        own.close()
        direct.close()
    history = client.http.get("/me/events", headers=auth(token)).json()["events"]
    assert [e["data"] for e in history] == ["hi"]
    assert token not in hub.log()


# -- the JWKS: rotation, refetching, and being away -------------------------------


def test_jwks_unreachable_is_503_and_ssehubs_own_tokens_still_work(
    start_server: Callable[..., Server],
) -> None:
    port = free_port()  # nothing listens here yet
    url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    srv = start_server(**jwks_env(url))
    api = Api(srv.url)
    signer = Idp()
    kid = signer.add("rsa")
    signer.stop()  # only its keys are needed: the JWKS is to be served on `port`
    token = signer.token(kid)
    for path in ("/users/me", "/stream"):
        r = api.http.get(path, headers=auth(token))
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1 and r.json()["detail"]
    r = api.http.post("/channels/x/events", json={"type": "t", "data": 1}, headers=auth(token))
    assert r.status_code == 503
    # ssehub's own tokens never wait for the identity provider.
    admin = api.admin()
    assert api.http.get("/users/me", headers=admin).status_code == 200
    assert api.http.post("/channels", json={"name": "still-up"}, headers=admin).status_code == 201
    back = Idp(port)
    try:
        back.keys, back.published = signer.keys, signer.published
        # An error page (a proxy in front of a provider that is down) is the same 503.
        back.status = 502
        # The failure above is remembered for 5 s: 503 without a fetch until then.
        wait_until(lambda: _refused_after_a_fetch(api, token, back), "refused", timeout=8)
        assert back.hits == 1
        # Once the provider answers, its tokens work: a failed fetch starts no
        # cooldown, only the 5 s in which the failure is remembered.
        back.status = 200
        wait_until(lambda: me(api, token).status_code == 200, "accepted", timeout=8)
        assert back.hits == 2
    finally:
        back.stop()
    assert "Traceback" not in srv.log()


def _refused_after_a_fetch(api: Api, token: str, idp: Idp) -> bool:
    """Whether ``token`` is refused with 503 once ``idp`` has been asked for its keys."""
    r = me(api, token)
    assert r.status_code == 503 and "retry-after" in r.headers, r.text
    return idp.hits > 0


def _timed_me(api: Api, token: str) -> tuple[int, float]:
    """The status of ``GET /users/me`` with ``token``, and how long it took."""
    own = Api(api.base_url)
    started = time.monotonic()
    try:
        status = me(own, token).status_code
    finally:
        own.http.close()
    return status, time.monotonic() - started


def test_a_failing_jwks_is_fetched_once_for_nine_waiting_requests(
    start_server: Callable[..., Server],
) -> None:
    """A provider that answers 503 after 3 s: one fetch serves every request that
    waits for it, and its failure is remembered for 5 s (503 without a fetch)."""
    idp = Idp()
    try:
        kid = idp.add("rsa")
        idp.status, idp.delay = 503, 3.0
        api = Api(start_server(**jwks_env(idp.url)).url)
        tokens = [idp.token(kid, sub=f"waiting-{i}") for i in range(9)]
        started = time.monotonic()
        with cf.ThreadPoolExecutor(9) as pool:
            answers = list(pool.map(lambda t: _timed_me(api, t), tokens))
        took = time.monotonic() - started
        assert [status for status, _ in answers] == [503] * 9, answers
        assert took < 6.5, f"nine requests took {took:.1f} s"
        assert idp.hits == 1, f"{idp.hits} fetches for nine requests"
        # Within 5 s of that failure: 503 at once, and no fetch.
        for token in tokens[:3]:
            status, waited = _timed_me(api, token)
            assert status == 503 and waited < 1.0, (status, waited)
        assert idp.hits == 1, "a remembered failure fetched again"
    finally:
        idp.stop()


def test_no_request_waits_more_than_6_s_for_a_jwks_that_trickles(
    start_server: Callable[..., Server],
) -> None:
    """A provider that sends its key set a byte at a time: each request gives up
    after 6 s, however long the one fetch goes on."""
    idp = Idp()
    try:
        kid = idp.add("rsa")
        idp.drip = 0.2  # a key set of several hundred bytes: minutes
        api = Api(start_server(**jwks_env(idp.url)).url)
        with cf.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda t: _timed_me(api, t), [idp.token(kid)] * 3))
        for status, waited in answers:
            assert status == 503 and waited < 7.0, answers
        assert idp.hits == 1, idp.hits
        # The fetch ends (the drip stops): the keys it brought verify.
        idp.drip = 0.0
        wait_until(lambda: me(api, idp.token(kid)).status_code == 200, "accepted", timeout=15)
        assert idp.hits == 1, idp.hits
    finally:
        idp.drip = 0.0
        idp.stop()


# -- one PEM key, or a shared secret ------------------------------------------------


def test_one_pem_public_key(start_server: Callable[..., Server], tmp_path: Path) -> None:
    key = new_key("ec")
    pem = tmp_path / "idp.pem"
    pem.write_bytes(public_pem(key))
    srv = start_server(
        SSEHUB_JWT_ISSUER=ISSUER, SSEHUB_JWT_PUBLIC_KEY_FILE=str(pem), SSEHUB_JWT_AUDIENCE=AUDIENCE
    )
    api = Api(srv.url)
    good = jwt.encode(claims(sub="pem-user"), key, algorithm="ES256")
    assert me(api, good).json()["username"] == username_for("pem-user")
    assert_401(me(api, jwt.encode(claims(), new_key("ec"), algorithm="ES256")))
    assert_401(me(api, jwt.encode(claims(), new_key("rsa"), algorithm="RS256")))
    # The PEM as an HMAC secret: the classic confusion against a configured key.
    header = b64json({"alg": "HS256", "typ": "JWT"})
    payload = b64json(claims())
    mac = hmac.new(pem.read_bytes(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert_401(me(api, f"{header}.{payload}.{b64url(mac)}"))
    assert_401(me(api, f"{b64json({'alg': 'none'})}.{payload}."))


def test_a_shared_hs256_secret(start_server: Callable[..., Server]) -> None:
    shared = secrets.token_urlsafe(48)
    srv = start_server(
        SSEHUB_JWT_ISSUER=ISSUER,
        SSEHUB_JWT_AUDIENCE=AUDIENCE,
        SSEHUB_JWT_SHARED_SECRET=shared,
        SSEHUB_JWT_ADMIN_CLAIM="",
    )
    api = Api(srv.url)
    good = jwt.encode(claims(sub="hs-user", roles=[ADMIN_ROLE]), shared, algorithm="HS256")
    r = me(api, good)
    assert r.status_code == 200, r.text
    user = r.json()
    # No admin claim configured: no external admins, whatever the token says.
    assert user["username"] == username_for("hs-user") and user["is_admin"] is False
    assert_401(me(api, jwt.encode(claims(aud=None), shared, algorithm="HS256")))
    assert_401(me(api, jwt.encode(claims(), secrets.token_urlsafe(48), algorithm="HS256")))
    # The issuer's secret cannot sign ssehub's own tokens, nor ssehub's key the issuer's.
    now = int(time.time())
    own = {"sub": str(user["id"]), "iat": now, "exp": now + 60, "scope": "access"}
    assert_401(me(api, jwt.encode(own, shared, algorithm="HS256")))
    assert_401(me(api, jwt.encode(claims(sub="hs-user"), TEST_SECRET, algorithm="HS256")))
    assert api.http.get("/users/me", headers=api.admin()).status_code == 200


def _serve_exit(
    env: dict[str, str], drop: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``ssehub serve`` expecting it to refuse to start."""
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_a_weak_or_reused_shared_secret_is_refused_at_start(database_url: str) -> None:
    weak = {
        "ssehub-own-key": TEST_SECRET,
        "short": "short-secret",
        "repetitive": "y" * 64,
        "placeholder": "change-me-to-a-long-random-string-42",
    }
    for case, secret in weak.items():
        done = _serve_exit(
            {
                "SSEHUB_DATABASE_URL": database_url,
                "SSEHUB_SECRET_KEY": TEST_SECRET,
                "SSEHUB_JWT_ISSUER": ISSUER,
                "SSEHUB_JWT_AUDIENCE": AUDIENCE,
                "SSEHUB_JWT_SHARED_SECRET": secret,
            }
        )
        assert done.returncode != 0, case
        assert "SSEHUB_JWT_SHARED_SECRET" in done.stderr, (case, done.stderr)
        assert "Traceback" not in done.stderr, (case, done.stderr)
        # Neither the refused secret nor the signing key is printed, not even in part.
        assert secret[-12:] not in done.stderr and TEST_SECRET[-12:] not in done.stderr, (
            case,
            done.stderr,
        )


def test_the_generated_key_cannot_be_the_shared_secret_either(
    database_url: str, tmp_path: Path
) -> None:
    """Without SSEHUB_SECRET_KEY the key is the data dir's file: the same rule holds."""
    (tmp_path / "secret_key").write_text(TEST_SECRET)
    done = _serve_exit(
        {
            "SSEHUB_DATABASE_URL": database_url,
            "SSEHUB_DATA_DIR": str(tmp_path),
            "SSEHUB_JWT_ISSUER": ISSUER,
            "SSEHUB_JWT_AUDIENCE": AUDIENCE,
            "SSEHUB_JWT_SHARED_SECRET": TEST_SECRET,
        },
        drop=("SSEHUB_SECRET_KEY",),
    )
    assert done.returncode != 0, done.stderr[-2000:]
    assert "SSEHUB_JWT_SHARED_SECRET" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_issuer_without_an_audience_is_refused_at_start(database_url: str) -> None:
    """Without an audience, a token the provider minted for any other of its
    applications would be accepted: serve refuses to start, and says why."""
    done = _serve_exit(
        {
            "SSEHUB_DATABASE_URL": database_url,
            "SSEHUB_SECRET_KEY": TEST_SECRET,
            "SSEHUB_JWT_ISSUER": ISSUER,
            "SSEHUB_JWT_JWKS_URL": "http://127.0.0.1:9/jwks",
        },
        drop=("SSEHUB_JWT_AUDIENCE",),
    )
    assert done.returncode != 0, done.stderr[-2000:]
    assert "SSEHUB_JWT_AUDIENCE" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_issuer_needs_exactly_one_source_of_keys(database_url: str, tmp_path: Path) -> None:
    common = {
        "SSEHUB_DATABASE_URL": database_url,
        "SSEHUB_SECRET_KEY": TEST_SECRET,
        "SSEHUB_JWT_AUDIENCE": AUDIENCE,
    }
    none = _serve_exit({**common, "SSEHUB_JWT_ISSUER": ISSUER})
    both = _serve_exit(
        {
            **common,
            "SSEHUB_JWT_ISSUER": ISSUER,
            "SSEHUB_JWT_JWKS_URL": "http://127.0.0.1:9/jwks",
            "SSEHUB_JWT_SHARED_SECRET": secrets.token_urlsafe(48),
        }
    )
    for done in (none, both):
        assert done.returncode != 0
        assert "SSEHUB_JWT_ISSUER needs exactly one" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_jwks_that_starts_failing_keeps_verifying_the_known_keys(souring: Rotating) -> None:
    """Near the end of the module, once the 30 s after the first fetch are over: an
    unknown kid refetches, the provider answers 503 after 3 s, and meanwhile (and
    after) the last good key set verifies its keys at once."""
    idp, api = souring.idp, souring.api
    idp.add("rsa", kid="unknown", publish=False)
    # A sleep: the contract's 30 s between refetches must be over, and nothing
    # shows that but the clock (asking would start the refetch under test).
    time.sleep(max(0.0, souring.fetched + REFETCH_SECONDS - time.monotonic()))
    idp.status, idp.delay = 503, 3.0
    with cf.ThreadPoolExecutor(6) as pool:
        unknown = [pool.submit(_timed_me, api, idp.token("unknown")) for _ in range(3)]
        wait_until(lambda: idp.hits == 2, "the refetch under way", timeout=5)
        known = [pool.submit(_timed_me, api, idp.token("known", sub="souring-user"))]
        known += [pool.submit(_timed_me, api, idp.token("known", sub=f"k{i}")) for i in range(2)]
        unknown_answers = [f.result() for f in unknown]
        known_answers = [f.result() for f in known]
    assert [status for status, _ in unknown_answers] == [503] * 3, unknown_answers
    for status, waited in known_answers:
        assert status == 200 and waited < 1.5, known_answers
    assert idp.hits == 2, f"{idp.hits - 1} refetches for three requests"
    # After the failed refetch: the known keys still verify, the unknown kid is a
    # 503 from memory (no fetch within 5 s).
    status, waited = _timed_me(api, idp.token("known", sub="after"))
    assert status == 200 and waited < 1.5, (status, waited)
    assert me(api, idp.token("unknown")).status_code == 503
    assert idp.hits == 2


def test_a_rotated_key_is_accepted_once_the_cooldown_ends(rotating: Rotating) -> None:
    """Last in the module, so the tests above fill most of the 30 s it waits for."""
    idp, api = rotating.idp, rotating.api
    if "new" not in idp.keys:
        idp.add("ed25519", kid="new")
    new = idp.token("new", sub="rotated")
    if time.monotonic() < rotating.fetched + REFETCH_SECONDS - 1:  # still cooling down
        assert_401(me(api, new))
    # A sleep: the contract's 30 s between refetches must be over, and nothing
    # shows that but the clock (asking early is refused, without a fetch).
    time.sleep(max(0.0, rotating.fetched + REFETCH_SECONDS - time.monotonic()))
    r = me(api, new)  # the first request after the 30 s refetches
    assert r.status_code == 200, f"the rotated key was not fetched after 30 s: {r.text}"
    assert idp.hits == 2, idp.hits  # one refetch, not one per request
    # That refetch starts a new cooldown; the old key still verifies.
    assert_401(me(api, idp.token(idp.add("rsa", publish=False))))
    assert me(api, idp.token("old", sub="first-user")).status_code == 200
    assert idp.hits == 2
