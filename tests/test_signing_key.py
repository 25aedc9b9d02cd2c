"""Instances on one database with different signing keys: the second refuses to start.

Each test has a database of its own: a server started with another key leaves
that key's fingerprint in ``signing_keys``, and for the next 15 s it would keep
the suite's servers (all on ``TEST_SECRET``) from starting on the shared one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support import (
    ROOT,
    TEST_SECRET,
    Server,
    free_port,
    migrated_database,
    sql,
    wait_until,
)

OTHER_SECRET = "another-test-secret-key-long-enough-for-hs256-9876543210"
REFUSAL = "another instance signs tokens with a different SSEHUB_SECRET_KEY"


@pytest.fixture
def own_database(postgres_server_url: str) -> Iterator[str]:
    with migrated_database(postgres_server_url, "ssehub_keys") as url:
        yield url


@pytest.fixture
def servers(own_database: str) -> Iterator[Callable[..., Server]]:
    """Make (not start) servers on this test's database; all stopped afterwards."""
    made: list[Server] = []

    def make(key: str = TEST_SECRET, workers: int = 1) -> Server:
        srv = Server(own_database, env={"SSEHUB_SECRET_KEY": key}, workers=workers)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()


def _refused(srv: Server) -> str:
    """Start ``srv``, expecting it to exit non-zero without serving; returns its log."""
    with pytest.raises(RuntimeError, match="exited early"):
        srv.start()
    assert srv.process is not None and srv.process.returncode != 0
    return srv.log()


def _rows(url: str) -> list[tuple[str, float]]:
    query = "SELECT fingerprint, extract(epoch FROM now() - last_seen_at)::float FROM signing_keys"
    return [(r[0], r[1]) for r in asyncio.run(sql(url, query))]


def _age_all_rows(url: str, seconds: float) -> None:
    asyncio.run(
        sql(
            url, "UPDATE signing_keys SET last_seen_at = now() - make_interval(secs => $1)", seconds
        )
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_an_instance_with_another_key_refuses_to_start(
    servers: Callable[..., Server], workers: int
) -> None:
    first = servers().start()
    log = _refused(servers(OTHER_SECRET, workers=workers))
    assert REFUSAL in log and "Traceback" not in log, log
    assert httpx.get(f"{first.url}/readyz").status_code == 200


def test_instances_with_the_same_key_start_side_by_side(
    servers: Callable[..., Server], own_database: str
) -> None:
    first = servers().start()
    second = servers().start()
    for srv in (first, second):
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
    rows = _rows(own_database)
    assert len(rows) == 1
    fingerprint = rows[0][0]
    # One-way: 64 hex digits that neither are nor contain the key.
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert TEST_SECRET not in fingerprint and fingerprint not in TEST_SECRET


def test_a_new_key_starts_once_the_old_instances_are_gone_15_s(
    servers: Callable[..., Server], own_database: str
) -> None:
    """A deliberate rotation: stop every instance, change the key, start after 15 s."""
    servers().start().stop()
    assert REFUSAL in _refused(servers(OTHER_SECRET))  # the old key was seen just now
    _age_all_rows(own_database, 16)
    rotated = servers(OTHER_SECRET).start()
    assert httpx.get(f"{rotated.url}/readyz").status_code == 200
    assert REFUSAL in _refused(servers(TEST_SECRET))  # and now the old key is the stranger


def test_a_running_instance_keeps_its_key_fresh_and_says_so_when_another_appears(
    servers: Callable[..., Server], own_database: str
) -> None:
    """Its row is refreshed every 5 s, so it blocks another key for as long as it runs; a
    key that got in anyway (the database was away for longer than 15 s) is logged."""
    srv = servers().start()
    _age_all_rows(own_database, 16)
    asyncio.run(
        sql(own_database, "INSERT INTO signing_keys VALUES ('f' || repeat('0', 63), now())")
    )
    wait_until(
        lambda: min(age for _, age in _rows(own_database)) < 6,
        "the running instance to refresh its row",
        timeout=8,
    )
    wait_until(lambda: REFUSAL in srv.log(), "the other key to be logged", timeout=8)
    assert httpx.get(f"{srv.url}/readyz").status_code == 200


def test_a_failing_refresh_is_logged_and_retried(
    servers: Callable[..., Server], own_database: str
) -> None:
    srv = servers().start()
    asyncio.run(sql(own_database, "ALTER TABLE signing_keys RENAME TO signing_keys_away"))
    try:
        wait_until(lambda: "could not refresh" in srv.log(), "a failed refresh logged", timeout=8)
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
        asyncio.run(sql(own_database, "UPDATE signing_keys_away SET last_seen_at = 'epoch'"))
    finally:
        asyncio.run(sql(own_database, "ALTER TABLE signing_keys_away RENAME TO signing_keys"))
    wait_until(lambda: _rows(own_database)[0][1] < 6, "the refresh to resume", timeout=8)


def test_every_process_checks_also_under_uvicorn_factory(
    servers: Callable[..., Server], own_database: str
) -> None:
    """The check is in the app's lifespan, not only in ``ssehub serve``."""
    servers().start()
    port = free_port()
    env = {**os.environ, "SSEHUB_DATABASE_URL": own_database, "SSEHUB_SECRET_KEY": OTHER_SECRET}
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app_from_env"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def exited_unready() -> bool:
        """Never ready while it runs; whether it has exited."""
        try:
            served = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code
        except httpx.HTTPError:
            served = None
        assert served != 200, "started with another key beside a running instance"
        return proc.poll() is not None

    try:
        wait_until(exited_unready, "uvicorn to refuse to start", 30)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert proc.returncode == 3, output  # uvicorn's "startup failed"
    assert REFUSAL in output
