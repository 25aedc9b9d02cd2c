"""Settings: every ``SSEHUB_*`` variable, in one place.

Values come from the environment and a ``.env`` file. ``.env.example`` lists
each one with its default; keep the two in step.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, PositiveInt, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("ssehub")

SECRET_FILE = "secret_key"
MIN_SECRET_LENGTH = 32
# Values copied from examples instead of generated: refused outright.
PLACEHOLDER_SECRETS = ("changeme", "change-me", "change_me", "changethis", "change-this")


class Settings(BaseSettings):
    """Runtime configuration; built once and handed to ``create_app``."""

    model_config = SettingsConfigDict(
        env_prefix="SSEHUB_", env_file=".env", extra="ignore", frozen=True
    )

    # Where ``ssehub serve`` listens unless --host/--port say otherwise, and where
    # ``ssehub healthcheck`` asks: one setting for both, so they cannot disagree.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    database_url: str | None = None
    # A direct connection for LISTEN (and migrations) when database_url goes
    # through PgBouncer in transaction mode.
    listen_database_url: str | None = None
    data_dir: Path = Path("./.ssehub")
    secret_key: str | None = None
    access_token_ttl_seconds: PositiveInt = 3600
    stream_token_ttl_seconds: PositiveInt = 3600
    admin_username: str | None = None
    admin_password: str | None = None
    registration_open: bool = True
    heartbeat_seconds: float = Field(default=15, gt=0)
    # Presence (app.realtime.presence): a stream back within the grace moves nobody;
    # an instance silent for the TTL is dead, and the others announce its users' leaves.
    presence_grace_seconds: float = Field(default=5, ge=0)
    presence_ttl_seconds: float = Field(default=15, gt=0)
    max_event_bytes: PositiveInt = 65536
    max_streams_per_user: PositiveInt = 20
    cors_origins: str = ""
    # Limits: what a hostile or broken client gets (README "Limits and abuse").
    max_batch_bytes: PositiveInt = 8 * 1024 * 1024
    login_attempts_per_minute: PositiveInt = 10
    trusted_proxies: str = ""
    max_connections: PositiveInt = 15000
    # Of those, at most this many from one client address (a trusted proxy's
    # connections are not counted: app.limits.ConnectionLimits.counts).
    max_connections_per_client: PositiveInt = 1000
    # A request body must keep coming (a byte at least this often) and be whole
    # this long after its head; a response whose writes stay backed up this long
    # is dropped (streams: the hub lets their reader go).
    body_idle_seconds: float = Field(default=10, gt=0)
    body_total_seconds: float = Field(default=60, gt=0)
    send_timeout_seconds: float = Field(default=30, gt=0)
    db_pool_size: int = Field(default=20, ge=2)
    # How live events reach the instances: Postgres LISTEN/NOTIFY and the log,
    # or NATS with interest routing (app.realtime.nats_broker).
    broker: Literal["postgres", "nats"] = "postgres"
    nats_url: str = "nats://127.0.0.1:4222"
    # Messages one NATS subscription may hold unprocessed; past it the client
    # drops them as a slow consumer's, and the log fills the gap (nats-py's default).
    nats_pending_limit: PositiveInt = 512 * 1024
    # NATS credentials beside those SSEHUB_NATS_URL may carry (user:password@ or
    # token@): a .creds file (a user JWT and its NKey seed), and a CA bundle
    # trusted for NATS's TLS in addition to the system's (app.realtime.nats_client).
    nats_creds: FilePath | None = None
    nats_tls_ca_file: FilePath | None = None
    # Your application's own tokens (app.auth.external); unset issuer: off.
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_jwks_url: str | None = None
    jwt_public_key_file: Path | None = None
    jwt_shared_secret: str | None = None
    jwt_user_claim: str = "sub"
    jwt_admin_claim: str | None = None
    jwt_admin_value: str = "ssehub:admin"
    # The stream cookie is Secure (HTTPS only) unless this is false.
    cookie_secure: bool = True
    # Tuning: how often history bounds are enforced,
    # and whether uvicorn logs a line per request.
    retention_interval_seconds: float = Field(default=1.0, gt=0)
    access_log: bool = True

    @field_validator("database_url", "listen_database_url")
    @classmethod
    def _asyncpg_url(cls, url: str | None) -> str | None:
        """ssehub reaches Postgres through asyncpg only. The URLs people copy from
        elsewhere (``postgres://``, ``postgresql://``) name the same server, so they
        are accepted; any other scheme would end in a traceback about a missing driver."""
        if not url:
            return None
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("postgresql+asyncpg", "postgresql", "postgres"):
            raise ValueError(
                "SSEHUB_DATABASE_URL must look like postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB"
            )
        return f"postgresql+asyncpg://{rest}"

    @field_validator("secret_key")
    @classmethod
    def _refuse_weak_keys(cls, key: str | None) -> str | None:
        """Anyone who guesses the key can sign tokens for any user, admin included."""
        if key is None or key == "":
            return None
        problem = weak_key_problem(key)
        if problem:
            raise ValueError(f"SSEHUB_SECRET_KEY {problem}")
        return key

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard_origin(cls, origins: str) -> str:
        """Stream endpoints allow credentials (the stream cookie) for the listed
        origins: with ``*`` every site a user visits could read their streams."""
        if "*" in _comma_list(origins):
            raise ValueError(
                "SSEHUB_CORS_ORIGINS must list the origins of your pages "
                "(https://app.example.com,...): '*' would let every site read streams "
                "with the user's cookie"
            )
        return origins

    @model_validator(mode="after")
    def _one_external_key(self) -> Settings:
        """External tokens need exactly one way to verify them and an audience, and a
        shared secret that is ssehub's own key would let the issuer sign ssehub's
        tokens. Without an audience, a token the provider minted for any other of
        its applications (they share its issuer) would be accepted here."""
        if not self.jwt_issuer:
            return self
        sources = [self.jwt_jwks_url, self.jwt_public_key_file, self.jwt_shared_secret]
        if sum(1 for source in sources if source) != 1:
            raise ValueError(
                "SSEHUB_JWT_ISSUER needs exactly one of SSEHUB_JWT_JWKS_URL, "
                "SSEHUB_JWT_PUBLIC_KEY_FILE and SSEHUB_JWT_SHARED_SECRET"
            )
        if self.jwt_shared_secret:
            problem = weak_key_problem(self.jwt_shared_secret)
            if problem:
                raise ValueError(f"SSEHUB_JWT_SHARED_SECRET {problem}")
            if self.jwt_shared_secret == self.secret_key:
                raise ValueError("SSEHUB_JWT_SHARED_SECRET must not be SSEHUB_SECRET_KEY")
        if not self.jwt_audience:
            raise ValueError(
                "SSEHUB_JWT_ISSUER needs SSEHUB_JWT_AUDIENCE: the aud that tokens meant "
                "for ssehub carry (an identity provider's other applications share its issuer)"
            )
        return self

    @property
    def behind_pgbouncer(self) -> bool:
        """A separate LISTEN URL means the main one goes through PgBouncer's
        transaction mode: no statement may stay prepared across transactions."""
        return bool(self.listen_database_url) and self.listen_database_url != self.database_url

    @property
    def cors_origin_list(self) -> list[str]:
        """The comma-separated ``SSEHUB_CORS_ORIGINS`` as a list."""
        return _comma_list(self.cors_origins)

    @property
    def trusted_proxy_list(self) -> list[str]:
        """The comma-separated ``SSEHUB_TRUSTED_PROXIES`` (addresses or CIDRs) as a list."""
        return _comma_list(self.trusted_proxies)


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class KeyFileError(Exception):
    """The key file in the data dir cannot be used; the message names the file."""


def weak_key_problem(key: str) -> str | None:
    """What makes ``key`` unfit to sign tokens, or None if nothing does.

    The one rule for both sources of the key, ``SSEHUB_SECRET_KEY`` and the
    key file in the data dir: a short, repetitive or placeholder key can be
    guessed, and whoever guesses it signs tokens for any user, admin included.
    """
    if len(key) < MIN_SECRET_LENGTH or len(set(key)) < 8:
        return (
            f"must be at least {MIN_SECRET_LENGTH} random characters "
            "(python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )
    if any(p in key.lower() for p in PLACEHOLDER_SECRETS):
        return "is a placeholder: set a random value"
    return None


def ensure_secret_key(settings: Settings) -> Settings:
    """Return settings with a signing key, generating one into the data dir if unset.

    A generated key survives restarts (so tokens stay valid) but is meant for
    development only, hence the warning.
    """
    if settings.secret_key:
        return settings
    path = settings.data_dir / SECRET_FILE
    if not path.exists():
        _create_secret_file(path)
    key = _read_secret_file(path)
    # The rule ``Settings`` applies to SSEHUB_SECRET_KEY, for the key it did not see.
    if settings.jwt_shared_secret == key:
        raise KeyFileError(f"SSEHUB_JWT_SHARED_SECRET must not be the signing key in {path}")
    return settings.model_copy(update={"secret_key": key})


def _read_secret_file(path: Path) -> str:
    """The key in ``path``, refused by the same rule as ``SSEHUB_SECRET_KEY``.

    A file emptied by a full disk, or edited by hand, would otherwise sign
    tokens with a key anyone can guess (an empty HMAC key is a valid one).
    """
    key = path.read_text().strip()
    problem = weak_key_problem(key) if key else "is empty"
    if problem:
        raise KeyFileError(
            f"refusing the signing key in {path}: it {problem}. Put a random key there, "
            "delete the file to have one generated, or set SSEHUB_SECRET_KEY"
        )
    return key


def _create_secret_file(path: Path) -> None:
    """Write a new random key to ``path`` unless another process got there first.

    Instances started together on one data dir must end up with one key: each
    writes its own private temporary file and links it into place; ``link``
    fails if the key exists, and the loser simply reads the winner's.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return
    finally:
        tmp.unlink()
    log.warning(
        "SSEHUB_SECRET_KEY is not set: generated a development key into %s. "
        "Set SSEHUB_SECRET_KEY in production.",
        path,
    )
