"""ssehub's own tokens (``app.auth.tokens``): what is signed, what is accepted
where, and that anything else is a 401, never a 500."""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt
import pytest

from app.auth.tokens import ALGORITHM, MAX_USER_ID, decode_token, issue_token
from app.config import Settings
from app.errors import Unauthorized

SETTINGS = Settings(
    _env_file=None,  # type: ignore[call-arg]
    secret_key=secrets.token_urlsafe(48),
    access_token_ttl_seconds=600,
    stream_token_ttl_seconds=60,
)
ACCESS = frozenset({"access"})
STREAM = frozenset({"stream"})
ANY = frozenset({"access", "stream"})


def signed(key: str | None = None, algorithm: str = ALGORITHM, **over: Any) -> str:
    """A token with valid claims but for ``over`` (``None`` drops a claim)."""
    now = int(time.time())
    claims = {"sub": "7", "iat": now, "exp": now + 60, "scope": "access", **over}
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key or SETTINGS.secret_key or "", algorithm=algorithm)


def test_an_access_token_carries_its_user_scope_and_expiry() -> None:
    token, ttl = issue_token(SETTINGS, 42, "access")
    claims = decode_token(SETTINGS, token, ACCESS)
    assert (claims.user_id, claims.scope, ttl) == (42, "access", 600)
    assert abs(claims.expires_at - (time.time() + 600)) < 5


def test_a_stream_token_opens_only_where_streams_are_accepted() -> None:
    token, ttl = issue_token(SETTINGS, 42, "stream")
    assert ttl == 60 and decode_token(SETTINGS, token, ANY).scope == "stream"
    with pytest.raises(Unauthorized, match="A stream token cannot be used here"):
        decode_token(SETTINGS, token, ACCESS)
    access, _ = issue_token(SETTINGS, 42, "access")
    with pytest.raises(Unauthorized, match=r"An? access token cannot be used here"):
        decode_token(SETTINGS, access, STREAM)


def test_a_token_never_outlives_the_one_that_obtained_it() -> None:
    not_after = time.time() + 10.9
    token, ttl = issue_token(SETTINGS, 1, "stream", not_after=not_after)
    expires_at = decode_token(SETTINGS, token, STREAM).expires_at
    assert ttl <= 11 and not_after - 2 < expires_at <= not_after  # whole seconds, down
    expired, ttl = issue_token(SETTINGS, 1, "stream", not_after=time.time() - 100)
    assert ttl == 0
    with pytest.raises(Unauthorized):
        decode_token(SETTINGS, expired, ANY)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(signed(exp=int(time.time()) - 5), id="expired"),
        pytest.param(signed(key="another-key-" * 4), id="wrong-key"),
        pytest.param(signed(algorithm="HS512"), id="hs512"),
        pytest.param(jwt.encode({"sub": "7"}, None, algorithm="none"), id="alg-none"),
        pytest.param(signed(scope=None), id="no-scope"),
        pytest.param(signed(exp=None), id="no-exp"),
        pytest.param(signed(iat=None), id="no-iat"),
        pytest.param(signed(sub=None), id="no-sub"),
        pytest.param(signed(sub="not-a-number"), id="sub-not-digits"),
        pytest.param(signed(sub=" 7"), id="sub-padded"),
        pytest.param(signed(sub="\u0667"), id="sub-non-ascii-digit"),
        pytest.param(signed(sub=str(MAX_USER_ID + 1)), id="sub-beyond-bigint"),
        pytest.param(signed(scope=["access"]), id="scope-list"),
        pytest.param(signed(scope={"a": 1}), id="scope-object"),
        pytest.param("not.a.token", id="garbage"),
    ],
)
def test_anything_else_is_a_401(token: str) -> None:
    with pytest.raises(Unauthorized):
        decode_token(SETTINGS, token, ANY)


def test_an_unknown_scope_is_refused_everywhere() -> None:
    with pytest.raises(Unauthorized, match=r"An? admin token cannot be used here"):
        decode_token(SETTINGS, signed(scope="admin"), ANY)


def test_the_largest_bigint_is_a_user_id() -> None:
    assert decode_token(SETTINGS, signed(sub=str(MAX_USER_ID)), ACCESS).user_id == MAX_USER_ID


def test_a_cached_token_is_refused_once_it_expires() -> None:
    token = signed(exp=int(time.time()) + 1)
    assert decode_token(SETTINGS, token, ACCESS).user_id == 7
    deadline = time.time() + 3
    while time.time() < deadline:
        try:
            decode_token(SETTINGS, token, ACCESS)
        except Unauthorized:
            return
        time.sleep(0.05)
    raise AssertionError("an expired token was still accepted from the cache")
