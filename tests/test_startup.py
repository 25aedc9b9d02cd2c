"""An instance started before its database (or its NATS server) waits for it.

Containers start in any order: an orchestrator (compose, Kubernetes) starts
ssehub and Postgres together, and podman-compose does not even wait for a
health check. So ``ssehub serve`` started first must keep trying, answer
``/healthz`` (alive) and ``/readyz`` 503 (not in rotation) meanwhile, and serve
as soon as the database is there. What waiting cannot mend (a wrong password,
a database that does not exist) ends it at once, with one line that says so.

The late Postgres is a cluster of the test's own (``initdb`` + ``pg_ctl`` of
Debian's Postgres 15), with password authentication on a free port: started
only after the instance, so every connection attempt before that is refused,
as it is while a database container boots.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import (
    ADMIN_PASSWORD,
    NATS_SERVER,
    ROOT,
    Api,
    NatsServer,
    Server,
    free_port,
    sql,
    wait_until,
)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "late-postgres-password"
WAIT_SECONDS = 60  # generous: the machine is shared


class LatePostgres:
    """A Postgres cluster made now and started when the test says so."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ssehub-late-pg-"))
        self.data = self.dir / "data"
        pwfile = self.dir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        self._chown(self.dir, pwfile)
        self._run(
            PG_BIN / "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
        )

    def url(self, password: str = PASSWORD, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres:{password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = self.dir / "postgres.log"
        self._run(
            PG_BIN / "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(log), "-w", "start"
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(PG_BIN / "pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _chown(*paths: Path) -> None:
        """initdb refuses to run as root: as root, the cluster is the postgres user's."""
        if os.geteuid() == 0:
            for path in paths:
                shutil.chown(path, "postgres", "postgres")

    def _run(self, *cmd: str | Path) -> None:
        argv = [str(part) for part in cmd]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)


@pytest.fixture
def late_postgres() -> Iterator[LatePostgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"{PG_BIN}/initdb is missing: Debian's postgresql-15 is needed")
    cluster = LatePostgres()
    try:
        yield cluster
    finally:
        cluster.stop()


def _waiting(srv: Server) -> None:
    """Alive but not ready: ``/healthz`` 200 and ``/readyz`` 503, still running."""

    def alive() -> bool:
        assert srv.process is not None and srv.process.poll() is None, srv.log()
        try:
            return httpx.get(f"{srv.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(alive, lambda: f"/healthz to answer:\n{srv.log()}", WAIT_SECONDS)
    ready = httpx.get(f"{srv.url}/readyz", timeout=2)
    assert ready.status_code == 503, ready.text
    assert ready.json()["status"] == "unavailable"
    # Anything else is not served yet, and says why.
    channels = httpx.get(f"{srv.url}/channels", timeout=2)
    assert channels.status_code == 503 and "detail" in channels.json()


def _logged(srv: Server, text: str, times: int = 1) -> None:
    """Wait until the server's log holds ``text`` at least ``times`` times."""
    wait_until(
        lambda: srv.log().count(text) >= times,
        lambda: f"{text!r} x{times} logged:\n{srv.log()}",
        WAIT_SECONDS,
    )


def _exits_with(srv: Server, message: str) -> None:
    """The process ends non-zero within seconds, its last line naming the fault."""
    assert srv.process is not None
    try:
        code = srv.process.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running (waiting forever?):\n{srv.log()}")
    assert code != 0
    assert message in srv.log(), srv.log()


def test_an_instance_started_before_its_database_waits_then_serves(
    late_postgres: LatePostgres,
) -> None:
    srv = Server(
        late_postgres.url(),
        env={"SSEHUB_ADMIN_USERNAME": "admin", "SSEHUB_ADMIN_PASSWORD": ADMIN_PASSWORD},
    ).launch()
    try:
        _waiting(srv)
        # Attempt after attempt refused: it keeps waiting, and says for what.
        _logged(srv, f"waiting for the database at 127.0.0.1:{late_postgres.port}/postgres", 3)
        _waiting(srv)
        assert PASSWORD not in srv.log()

        late_postgres.start()
        srv.wait_ready(WAIT_SECONDS)
        # Migrated and with its admin: a real instance, not a stand-in.
        api = Api(srv.url)
        channel = api.http.post("/channels", json={"name": "late"}, headers=api.admin())
        assert channel.status_code == 201, channel.text
        rows = asyncio.run(sql(late_postgres.url(), "SELECT name FROM channels WHERE NOT private"))
        assert [row["name"] for row in rows] == ["late"]
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"password": "not-the-password"}, 'password authentication failed for user "postgres"'),
        ({"database": "no_such_db"}, 'database "no_such_db" does not exist'),
    ],
    ids=["wrong-password", "missing-database"],
)
def test_a_refused_database_login_is_an_error_not_a_wait(
    late_postgres: LatePostgres, fault: dict[str, str], message: str
) -> None:
    late_postgres.start()
    srv = Server(late_postgres.url(**fault)).launch()
    try:
        _exits_with(srv, message)
    finally:
        srv.stop()


def test_an_instance_started_before_its_nats_server_waits_then_serves(database_url: str) -> None:
    if not Path(NATS_SERVER).exists():
        pytest.fail("nats-server is not installed (.ci/run installs it)")
    nats = NatsServer()
    srv = Server(database_url, env={"SSEHUB_BROKER": "nats", "SSEHUB_NATS_URL": nats.url})
    srv.launch()
    try:
        _waiting(srv)
        _logged(srv, f"waiting for NATS at {nats.url}")
        nats.start()
        srv.wait_ready(WAIT_SECONDS)
    finally:
        srv.stop()
        nats.stop()


def test_a_waiting_instance_stops_at_once_on_sigterm() -> None:
    """An orchestrator that gives up on a start must not wait for the backoff."""
    nothing_there = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"
    srv = Server(nothing_there).launch()
    _waiting(srv)
    _logged(srv, "waiting for the database")
    assert srv.stop() < 5
    assert srv.process is not None and srv.process.returncode != 0
    with socket.socket() as s:  # the port is free again, for the next process to bind
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", srv.port))
        s.listen()


def _healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    """``ssehub healthcheck``, the image's HEALTHCHECK, with this environment."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "healthcheck"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_the_health_check_asks_readiness_on_the_port_serve_listens_on() -> None:
    """``SSEHUB_PORT`` is where ``serve`` listens and where ``healthcheck`` asks:
    a container that moves its port moves both, so its health check cannot
    knock on the wrong one. A process that is alive but not ready fails it."""
    port = free_port()
    nothing_there = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"
    srv = Server(nothing_there, port=port, env={"SSEHUB_PORT": str(port)}, port_flag=False)
    srv.launch()
    try:
        _waiting(srv)
        done = _healthcheck(SSEHUB_PORT=str(port))
        assert done.returncode != 0
        assert "503" in done.stderr and "Traceback" not in done.stderr
    finally:
        srv.stop()
    done = _healthcheck(SSEHUB_PORT=str(port))  # nobody there at all
    assert done.returncode != 0 and "Traceback" not in done.stderr


def test_the_health_check_passes_on_a_ready_instance(server: Server) -> None:
    done = _healthcheck(SSEHUB_PORT=str(server.port))
    assert done.returncode == 0, done.stderr
