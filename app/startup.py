"""Before ``ssehub serve`` serves: wait for the database and NATS, answering health checks.

Containers start in any order, so an instance may come up before its
database or its NATS server. It waits for each (retrying with backoff and
jitter, and logging what it waits for and why) instead of exiting; meanwhile
its port answers ``/healthz`` 200 (the process is alive: no restart) and
everything else 503, ``/readyz`` included (not in a load balancer's
rotation). The migrations and the admin's bootstrap also run in that time, so
the port answers until the app itself takes it over.

What waiting cannot mend ends the start at once with one line
(``CannotStart``): a password the database refuses, a database or role that
does not exist, a NATS server that refuses the credentials.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from app.config import Settings
from app.db import ACQUIRE_TIMEOUT_SECONDS, asyncpg_dsn, connection_options

log = logging.getLogger("ssehub")

BACKOFF_FIRST_SECONDS = 0.25
BACKOFF_MAX_SECONDS = 5.0
# Connection failures that a later attempt may not meet: nothing listens yet
# (refused, a name not in DNS yet, a timeout), or Postgres is starting, shutting
# down, or full. A TLS failure is a configuration fault, not a wait.
DATABASE_NOT_UP = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
)


class CannotStart(Exception):
    """A fault that waiting cannot mend; the message says which, without secrets."""


class NotYet(Exception):
    """The dependency is not reachable yet: worth another try."""


async def wait_for(what: str, probe: Callable[[], Awaitable[None]]) -> None:
    """Call ``probe`` until it stops raising ``NotYet``, sleeping between tries.

    The sleep doubles from ``BACKOFF_FIRST_SECONDS`` up to
    ``BACKOFF_MAX_SECONDS``, each drawn between half and all of it, so that
    instances started together do not knock in step. Anything but ``NotYet``
    propagates: a refusal is not worth waiting for.
    """
    delay = BACKOFF_FIRST_SECONDS
    waited = False
    while True:
        try:
            await probe()
        except NotYet as exc:
            log.warning("waiting for %s: %s (next try within %.2f s)", what, exc, delay)
            waited = True
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)
            continue
        if waited:
            log.info("%s is up", what)
        return


def database_address(url: str) -> str:
    """``host:port/database`` of a database URL: no user, no password."""
    parts = urlsplit(asyncpg_dsn(url))
    host = parts.hostname or parse_qs(parts.query).get("host", ["localhost"])[0]
    return f"{host}:{parts.port or 5432}{parts.path}"


async def database_answers(url: str, pgbouncer: bool) -> None:
    """One connection to ``url``, made with the options ssehub's own connections
    to it use (``pgbouncer``: none PgBouncer would refuse), closed at once;
    ``NotYet`` while it cannot be made."""
    where = database_address(url)
    options = connection_options("ssehub-start", ACQUIRE_TIMEOUT_SECONDS, pgbouncer)
    try:
        conn = await asyncpg.connect(asyncpg_dsn(url), **options)
    except ssl.SSLError as exc:
        raise CannotStart(f"cannot use the database at {where}: {exc}") from exc
    except DATABASE_NOT_UP as exc:
        raise NotYet(f"{type(exc).__name__}: {exc}") from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CannotStart(f"cannot use the database at {where}: {exc}") from exc
    await conn.close()


async def nats_answers(settings: Settings) -> None:
    """One connection to NATS, made as the broker makes it (credentials, creds
    file, TLS trust), closed at once; ``NotYet`` while no server answers."""
    from nats.errors import Error as NatsError
    from nats.errors import NoServersError

    from app.realtime import nats_client

    failures: list[Exception] = []

    async def note(exc: Exception) -> None:
        failures.append(exc)

    where = nats_address(settings.nats_url)
    try:
        # Each server tried twice, then NoServersError: nats-py's own retries
        # would otherwise go on for ever inside this one call.
        nc = await nats_client.connect(
            settings.nats_url,
            settings.nats_creds,
            settings.nats_tls_ca_file,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            connect_timeout=ACQUIRE_TIMEOUT_SECONDS,
            error_cb=note,
        )
    except (NoServersError, OSError) as exc:
        cause = failures[-1] if failures else exc
        raise NotYet(f"{type(cause).__name__}: {cause}") from exc
    except NatsError as exc:
        raise CannotStart(f"NATS at {where} refused ssehub: {exc}") from exc
    await nc.close()


def nats_address(url: str) -> str:
    """The NATS server(s) of ``url`` without the credentials it may carry."""
    from app.realtime.nats_client import split_credentials

    return split_credentials(url).server


def wait_for_dependencies(settings: Settings) -> None:
    """Wait for every database URL (the direct one first: a PgBouncer in front
    answers only once Postgres does) and, with ``SSEHUB_BROKER=nats``, for NATS."""

    async def run() -> None:
        # The direct URL first: a PgBouncer in front answers only once Postgres does.
        urls = [(settings.listen_database_url, False)]
        urls.append((settings.database_url, settings.behind_pgbouncer))
        for url, pgbouncer in urls:
            if url:
                probe = functools.partial(database_answers, url, pgbouncer)
                await wait_for(f"the database at {database_address(url)}", probe)
        if settings.broker == "nats":
            where = nats_address(settings.nats_url)
            await wait_for(f"NATS at {where}", functools.partial(nats_answers, settings))

    asyncio.run(run())


# ``app.ops.Readiness``: no check can pass before the app runs.
NOT_READY: dict[str, object] = {"status": "unavailable", "database": False}
NOT_READY |= {"listener": False, "broker": False, "writer": False}


class StartingHandler(BaseHTTPRequestHandler):
    """What the port answers before the app runs: alive, not ready, nothing served."""

    timeout = 5  # a client that sends nothing does not keep its thread
    server_version = "ssehub"
    sys_version = ""

    def _answer(self) -> None:
        path = urlsplit(self.path).path
        body: dict[str, object]
        if path == "/healthz":
            status, body = 200, {"status": "ok"}
        elif path == "/readyz":
            status, body = 503, NOT_READY
        else:
            status, body = 503, {"detail": "starting: not serving yet"}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Health checks every few seconds are not worth a line each."""


class _StartingServer(ThreadingHTTPServer):
    daemon_threads = True


class _StartingServer6(_StartingServer):
    address_family = socket.AF_INET6


@contextmanager
def answering_health_checks(host: str, port: int) -> Iterator[None]:
    """Serve ``StartingHandler`` on ``host:port`` in a thread for the block's duration.

    The port is released when the block ends, for uvicorn to bind it again
    (both set ``SO_REUSEADDR``). A port already taken is ``CannotStart``.
    """
    server_class = _StartingServer6 if ":" in host else _StartingServer
    try:
        server = server_class((host, port), StartingHandler)
    except OSError as exc:
        raise CannotStart(f"cannot listen on {host}:{port}: {exc}") from exc
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="starting", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
