"""Settings validation (``app.config``): what a deployment is refused at start-up,
and the signing key kept in the data dir."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import SECRET_FILE, KeyFileError, Settings, ensure_secret_key, weak_key_problem

GOOD_KEY = "Jq3vX9-kLm2RtY7wPz4sNc8Hb6Ud1GfEa5OiTx0Vy_QhWrSj"  # fixed: test ids must agree


@pytest.fixture(autouse=True)
def no_ssehub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``SSEHUB_*`` of the environment the suite runs in (the broker, say) stay out."""
    for name in [k for k in os.environ if k.startswith("SSEHUB_")]:
        monkeypatch.delenv(name)


def settings(**values: Any) -> Settings:
    """Settings from ``values`` alone: no ``.env`` file either."""
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql://u:p@h:5433/db", "postgresql+asyncpg://u:p@h:5433/db"),
        ("postgres://u@h/db?sslmode=require", "postgresql+asyncpg://u@h/db?sslmode=require"),
    ],
)
def test_postgres_urls_of_any_spelling_use_asyncpg(given: str, kept: str) -> None:
    assert settings(database_url=given, listen_database_url=given).database_url == kept
    assert settings(listen_database_url=given).listen_database_url == kept


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql+psycopg://u@h/db", "h:5432/db"])
def test_other_database_urls_are_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="postgresql\\+asyncpg://USER"):
        settings(database_url=url)


def test_an_empty_database_url_means_none() -> None:
    assert settings(database_url="").database_url is None


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("short", "at least 32"),
        ("ab" * 40, "at least 32"),  # long, but seven distinct characters at most
        ("changeme-" + GOOD_KEY, "placeholder"),
        ("x" + GOOD_KEY + "Change_Me", "placeholder"),
    ],
)
def test_weak_signing_keys_are_refused(key: str, problem: str) -> None:
    assert problem in (weak_key_problem(key) or "")
    with pytest.raises(ValidationError, match=problem):
        settings(secret_key=key)


def test_a_random_key_is_kept_and_an_empty_one_is_none() -> None:
    assert weak_key_problem(GOOD_KEY) is None
    assert settings(secret_key=GOOD_KEY).secret_key == GOOD_KEY
    assert settings(secret_key="").secret_key is None


def test_a_wildcard_cors_origin_is_refused() -> None:
    with pytest.raises(ValidationError, match="'\\*' would let every site"):
        settings(cors_origins="https://a.example, *")
    kept = settings(cors_origins=" https://a.example ,, https://b.example ")
    assert kept.cors_origin_list == ["https://a.example", "https://b.example"]


def test_external_tokens_need_one_key_source_and_an_audience() -> None:
    issuer = {"jwt_issuer": "https://idp.example/", "jwt_audience": "ssehub"}
    with pytest.raises(ValidationError, match="exactly one of"):
        settings(**issuer)
    with pytest.raises(ValidationError, match="exactly one of"):
        settings(**issuer, jwt_jwks_url="https://idp.example/jwks", jwt_shared_secret=GOOD_KEY)
    with pytest.raises(ValidationError, match="needs SSEHUB_JWT_AUDIENCE"):
        settings(jwt_issuer="https://idp.example/", jwt_jwks_url="https://idp.example/jwks")
    assert settings(**issuer, jwt_jwks_url="https://idp.example/jwks").jwt_audience == "ssehub"
    assert settings(jwt_shared_secret="short").jwt_shared_secret == "short"  # off: unchecked


def test_an_external_shared_secret_must_be_strong_and_not_ssehubs_key() -> None:
    issuer = {"jwt_issuer": "https://idp.example/", "jwt_audience": "ssehub"}
    with pytest.raises(ValidationError, match="SSEHUB_JWT_SHARED_SECRET must be at least"):
        settings(**issuer, jwt_shared_secret="short")
    with pytest.raises(ValidationError, match="must not be SSEHUB_SECRET_KEY"):
        settings(**issuer, jwt_shared_secret=GOOD_KEY, secret_key=GOOD_KEY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 0),
        ("port", 65536),
        ("heartbeat_seconds", 0),
        ("max_event_bytes", 0),
        ("db_pool_size", 1),
        ("broker", "redis"),
    ],
)
def test_out_of_range_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        settings(**{field: value})


def test_a_separate_listen_url_means_pgbouncer() -> None:
    direct = "postgresql+asyncpg://u@h:5432/db"
    assert not settings(database_url=direct).behind_pgbouncer
    assert not settings(database_url=direct, listen_database_url=direct).behind_pgbouncer
    pooled = settings(database_url="postgresql+asyncpg://u@h:6432/db", listen_database_url=direct)
    assert pooled.behind_pgbouncer


def test_a_generated_key_is_written_once_and_kept(tmp_path: Path) -> None:
    first = ensure_secret_key(settings(data_dir=tmp_path))
    again = ensure_secret_key(settings(data_dir=tmp_path))
    assert first.secret_key and weak_key_problem(first.secret_key) is None
    assert again.secret_key == first.secret_key
    assert (tmp_path / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [SECRET_FILE]  # no temporary file left


def test_a_set_key_wins_over_the_key_file(tmp_path: Path) -> None:
    assert (
        ensure_secret_key(settings(data_dir=tmp_path, secret_key=GOOD_KEY)).secret_key == GOOD_KEY
    )
    assert not (tmp_path / SECRET_FILE).exists()


@pytest.mark.parametrize(("content", "problem"), [("", "is empty"), ("guessable", "at least 32")])
def test_a_weak_key_file_is_refused(tmp_path: Path, content: str, problem: str) -> None:
    (tmp_path / SECRET_FILE).write_text(content)
    with pytest.raises(KeyFileError, match=problem):
        ensure_secret_key(settings(data_dir=tmp_path))


def test_the_key_file_may_not_be_the_external_shared_secret(tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text(GOOD_KEY + "\n")
    external = settings(
        data_dir=tmp_path,
        jwt_issuer="https://idp.example/",
        jwt_audience="ssehub",
        jwt_shared_secret=GOOD_KEY,
    )
    with pytest.raises(KeyFileError, match="must not be the signing key"):
        ensure_secret_key(external)
