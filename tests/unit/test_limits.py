"""The pure parts of the connection limits (``app.limits``): whose connections
count per client, and the numbers handed to uvicorn. The limits themselves are
tested on a real server (``tests/test_limits.py``)."""

from __future__ import annotations

import secrets

import pytest

from app.config import Settings
from app.limits import ConnectionLimits, missing_uvicorn_hooks, uvicorn_limit_concurrency


def limits(trusted_proxies: str) -> ConnectionLimits:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        secret_key=secrets.token_urlsafe(48),
        trusted_proxies=trusted_proxies,
        max_connections_per_client=7,
    )
    return ConnectionLimits.from_settings(settings)


def test_without_trusted_proxies_every_connection_counts() -> None:
    none = limits("")
    assert none.per_client == 7 and none.proxies == () and not none.proxy_names
    assert none.counts("127.0.0.1") and none.counts("::1") and none.counts("unix")


@pytest.mark.parametrize(
    ("host", "counted"),
    [
        ("10.0.0.9", False),  # in 10.0.0.0/24
        ("10.0.1.9", True),
        ("::ffff:10.0.0.9", False),  # an IPv4 peer on a dual-stack socket
        ("192.168.1.5", False),  # listed as a single address
        ("fd00::1", False),
        ("fd01::1", True),
        ("proxy.internal", False),  # a name is matched literally
        ("other.internal", True),
    ],
)
def test_a_trusted_proxys_connections_do_not_count(host: str, counted: bool) -> None:
    trusted = limits("10.0.0.0/24, 192.168.1.5, fd00::/64, proxy.internal")
    assert trusted.counts(host) is counted


def test_a_star_trusts_every_peer() -> None:
    star = limits("*")
    assert not star.counts("203.0.113.1") and not star.counts("::1")


def test_uvicorn_serves_exactly_max_connections() -> None:
    """uvicorn refuses at ``limit_concurrency`` counting the asker: one more."""
    assert uvicorn_limit_concurrency(15000) == 15001


def test_this_uvicorn_calls_every_method_the_limits_override() -> None:
    assert missing_uvicorn_hooks() == []
