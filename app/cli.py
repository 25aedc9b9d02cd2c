"""``ssehub serve | migrate | create-admin | api-key create | grant-publisher |
healthcheck``, and ``publish`` / ``tail``, the Python client's commands (``ssehub_client.cli``)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from app.config import KeyFileError, Settings, ensure_secret_key

log = logging.getLogger("ssehub")
T = TypeVar("T")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def migrations_root() -> Path:
    """Where ``alembic.ini`` and ``migrations/`` are: the source tree (an editable
    install), else the working directory (the Docker image puts them there)."""
    for root in (PROJECT_ROOT, Path.cwd()):
        if (root / "alembic.ini").exists():
            return root
    raise SystemExit("alembic.ini not found: run ssehub from the project directory")


@contextmanager
def database(settings: Settings) -> Iterator[Settings]:
    """Settings with a database URL: the configured one, or the embedded Postgres.

    The embedded server is started here, in the parent process, so that every
    worker shares it; it is stopped when the block exits.
    """
    if settings.database_url:
        yield settings
        return
    from app.db import start_embedded_postgres

    url, server = start_embedded_postgres(settings.data_dir)
    try:
        yield settings.model_copy(update={"database_url": url})
    finally:
        server.cleanup()


def alembic_config(database_url: str) -> Any:
    """Alembic's config for ``database_url``, wherever the command runs from."""
    from alembic.config import Config

    root = migrations_root()
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(settings: Settings) -> None:
    """``alembic upgrade head``, on the direct connection when there is one: the
    migrations take a session-level lock, which PgBouncer's transaction mode
    would hand to whichever server connection it likes."""
    from alembic import command

    url = settings.listen_database_url or settings.database_url
    assert url
    command.upgrade(alembic_config(url), "head")
    if settings.behind_pgbouncer:  # PgBouncer passes on no search_path (app.db.SEARCH_PATH)
        from app.db import pin_search_path

        on_direct_connection(settings, pin_search_path)


def on_direct_connection(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(conn)`` on a connection of its own to the database, past
    PgBouncer when there is one (``SSEHUB_LISTEN_DATABASE_URL``)."""
    url = settings.listen_database_url or settings.database_url
    assert url
    return on_connection(url, False, work)


def on_connection(url: str, pgbouncer: bool, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(conn)`` on a connection of its own to ``url``, opened as the
    server opens its own (``app.db.connection_options``)."""
    from app.db import QUERY_TIMEOUT_SECONDS, asyncpg_dsn, connection_options

    async def run() -> T:
        options = connection_options("ssehub-cli", QUERY_TIMEOUT_SECONDS, pgbouncer)
        conn = await asyncpg.connect(asyncpg_dsn(url), **options)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


GRANT_PUBLISHER = (
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT EXECUTE ON FUNCTION public.ssehub_enqueue(text, text, jsonb, text) TO {role}",
)


def grant_publisher(settings: Settings, role: str) -> None:
    """Let database role ``role`` call ``ssehub_enqueue`` and no other function or
    table of ssehub's: the function runs with its owner's rights (SECURITY
    DEFINER), so the role needs no right on any table, and it runs none of the
    role's own code (``app.events.functions``)."""
    migrate(settings)

    async def grant(conn: Any) -> None:
        quoted = await conn.fetchval("SELECT pg_catalog.quote_ident($1)", role)
        async with conn.transaction():
            for statement in GRANT_PUBLISHER:
                await conn.execute(statement.format(role=quoted))

    try:
        on_direct_connection(settings, grant)
    except asyncpg.UndefinedObjectError:
        sys.exit(f"ssehub: no database role {role!r}: create it first (CREATE ROLE ...)")
    print(f"role {role} may now call ssehub_enqueue(channel, type, data, idempotency_key)")


def in_session(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(session)`` in one committed transaction on its own connection."""
    from app.db import create_engine, create_sessionmaker

    async def run() -> T:
        assert settings.database_url
        engine = create_engine(
            settings.database_url, pool_size=1, pgbouncer=settings.behind_pgbouncer
        )
        try:
            async with create_sessionmaker(engine)() as session:
                result = await work(session)
                await session.commit()
                return result
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _ensure_admin(settings: Settings, username: str, password: str, *, reset: bool) -> bool:
    """Create ``username`` as an admin if missing; with ``reset``, promote an
    existing one and set its password. Returns whether it was created."""
    from app.auth.service import ensure_admin

    async def work(session: Any) -> bool:
        _, created = await ensure_admin(session, username, password, reset=reset)
        return created

    return in_session(settings, work)


def create_api_key(settings: Settings, name: str, patterns: list[str]) -> None:
    """Print a new API key (only its hash is stored: this is the one time it is seen)."""
    from app.auth.api_key_routes import ApiKeyIn
    from app.auth.api_keys import create_key

    try:
        body = ApiKeyIn(name=name, publish=patterns)
    except ValueError as exc:
        sys.exit(f"invalid API key: {exc}")
    migrate(settings)

    async def work(session: Any) -> str:
        _, key = await create_key(session, body.name, body.publish)
        return key

    print(in_session(settings, work))


def _bootstrap_admin(settings: Settings, username: str, password: str) -> None:
    """The admin of ``SSEHUB_ADMIN_*``, created on the first start only."""
    if _ensure_admin(settings, username, password, reset=False):
        log.info("created admin %s", username)
    else:
        log.info(
            "admin %s exists: left as it is (`ssehub create-admin %s` resets its password)",
            username,
            username,
        )


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """uvicorn re-raises the SIGTERM it handled once it is done; exiting
    normally here (not dying of the signal) lets ``database()`` stop the
    embedded Postgres."""
    raise SystemExit(128 + signum)


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    """Wait for the database (and NATS), migrate, create the bootstrap admin if
    missing, then run uvicorn with the app factory."""
    from app.realtime.server import run_server
    from app.startup import answering_health_checks, wait_for_dependencies

    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    if settings.admin_username and settings.admin_password:
        _check_admin_account(settings.admin_username, settings.admin_password)
    elif settings.admin_username or settings.admin_password:
        log.warning("SSEHUB_ADMIN_USERNAME and SSEHUB_ADMIN_PASSWORD go together: no admin made")
    # Until uvicorn takes the port over, it answers health checks: alive, not ready.
    with answering_health_checks(host, port):
        wait_for_dependencies(settings)
        migrate(settings)
        _check_search_path(settings)
        _check_signing_key(settings)
        if settings.admin_username and settings.admin_password:
            _bootstrap_admin(settings, settings.admin_username, settings.admin_password)
    # Workers build their app from the environment: hand them the resolved values.
    assert settings.database_url and settings.secret_key
    os.environ["SSEHUB_DATABASE_URL"] = settings.database_url
    os.environ["SSEHUB_SECRET_KEY"] = settings.secret_key
    run_server(host=host, port=port, workers=workers, settings=settings)


HEALTHCHECK_TIMEOUT_SECONDS = 3.0
EVERY_ADDRESS_ASKED_ON = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 (not bound)


def healthcheck(host: str, port: int) -> None:
    """Exit 0 if the server on ``host:port`` is ready (``/readyz`` 200), else exit 1
    with one line saying why. A server listening on every address is asked on
    loopback. Readiness, not liveness: a process whose database or listener is
    down must leave its load balancer's rotation."""
    import http.client

    host = EVERY_ADDRESS_ASKED_ON.get(host, host)
    conn = http.client.HTTPConnection(host, port, timeout=HEALTHCHECK_TIMEOUT_SECONDS)
    try:
        conn.request("GET", "/readyz")
        status = conn.getresponse().status
    except OSError as exc:
        sys.exit(f"ssehub: no answer from {host}:{port}: {exc}")
    finally:
        conn.close()
    if status != 200:
        sys.exit(f"ssehub: not ready: /readyz on {host}:{port} answered {status}")


def _check_search_path(settings: Settings) -> None:
    """Exit with one line if a session on ``SSEHUB_DATABASE_URL`` would search
    ``public``: behind PgBouncer the path is the role's default, set by
    ``migrate`` (``app.db.connection_options``)."""
    from app.db import UnsafeSearchPath, check_search_path

    assert settings.database_url
    try:
        on_connection(settings.database_url, settings.behind_pgbouncer, check_search_path)
    except UnsafeSearchPath as exc:
        sys.exit(f"ssehub: {exc}")


def _check_signing_key(settings: Settings) -> None:
    """Exit with one line if another instance signs with another key.

    Every worker checks again as it starts (``app.auth.signing_key``), but a
    failed start-up there is a traceback, and with ``--workers`` uvicorn's
    parent exits 0: checking here first makes the common case one clear line
    and a non-zero exit.
    """
    from app.auth.signing_key import SigningKeyConflict, claim, fingerprint

    assert settings.database_url and settings.secret_key
    fp = fingerprint(settings.secret_key)

    async def check(conn: Any) -> None:
        await claim(conn, fp)

    try:
        on_connection(settings.database_url, settings.behind_pgbouncer, check)
    except SigningKeyConflict as exc:
        sys.exit(f"ssehub: {exc}")


def _check_admin_account(username: str, password: str) -> None:
    """Exit unless the admin could have registered: a name outside the rules could
    never log in (login refuses impossible names before any query)."""
    from app.auth.schemas import RegisterIn

    try:
        RegisterIn(username=username, password=password)
    except ValueError as exc:
        sys.exit(f"invalid admin account: {exc}")


def create_admin(settings: Settings, username: str) -> None:
    """Create ``username`` as an admin, or promote it and reset its password."""
    password = os.environ.get("SSEHUB_ADMIN_PASSWORD") or getpass.getpass(
        f"Password for {username}: "
    )
    _check_admin_account(username, password)
    migrate(settings)
    created = _ensure_admin(settings, username, password, reset=True)
    print(f"created admin {username}" if created else f"promoted admin {username}, password reset")


CLIENT_COMMANDS = ("publish", "tail", "presence")


def client_commands(commands: Any) -> None:
    """``publish``, ``tail`` and ``presence``: the Python client's (``ssehub_client.cli``)."""
    try:
        from ssehub_client.cli import add_commands
    except ImportError:  # the server without its client: say how to get them
        for name in CLIENT_COMMANDS:
            commands.add_parser(name, help="needs the ssehub-client package (clients/python)")
        return
    add_commands(commands)


def run_client(args: argparse.Namespace) -> None:
    try:
        from ssehub_client.cli import run
    except ImportError:
        sys.exit("ssehub publish/tail/presence need the client: pip install ./clients/python")
    run(args)


def configure_logging() -> None:
    """Our own lines and uvicorn's at INFO; the embedded Postgres and Alembic's plugins quiet."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:     %(message)s")
    for name in ("ssehub", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.INFO)
    warnings.filterwarnings("ignore", module="platformdirs")


def _problems(exc: ValidationError) -> str:
    """One line per invalid setting, without the values pydantic would print:
    they are secrets (a shared JWT secret, the signing key, a database password)."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"])
        lines.append(f"  {where}: {error['msg']}" if where else f"  {error['msg']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ssehub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_p = commands.add_parser("serve", help="apply migrations, then serve HTTP")
    serve_p.add_argument("--host", help="default: SSEHUB_HOST, else 127.0.0.1")
    serve_p.add_argument("--port", type=int, help="default: SSEHUB_PORT, else 8000")
    serve_p.add_argument("--workers", type=int, default=1)
    health_p = commands.add_parser(
        "healthcheck", help="exit 0 if the local server answers /readyz with 200 (for HEALTHCHECK)"
    )
    health_p.add_argument("--host", help="default: SSEHUB_HOST, else 127.0.0.1")
    health_p.add_argument("--port", type=int, help="default: SSEHUB_PORT, else 8000")
    commands.add_parser("migrate", help="apply the Alembic migrations and exit")
    admin_p = commands.add_parser(
        "create-admin", help="create an admin, or promote a user and reset its password"
    )
    admin_p.add_argument("username")
    keys_p = commands.add_parser("api-key", help="API keys for backend publishers")
    keys = keys_p.add_subparsers(dest="api_key_command", required=True)
    create_key_p = keys.add_parser("create", help="create a key and print it (shown only once)")
    create_key_p.add_argument("name")
    create_key_p.add_argument(
        "--publish",
        nargs="+",
        required=True,
        metavar="PATTERN",
        help="channels it may publish to and read; * matches any run of characters",
    )
    grant_p = commands.add_parser(
        "grant-publisher", help="let a database role call ssehub_enqueue (and nothing else)"
    )
    grant_p.add_argument("role")
    client_commands(commands)
    args = parser.parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        run_client(args)  # an HTTP client of a running server: no database here
        return

    configure_logging()
    try:
        settings = Settings()
        if args.command == "healthcheck":  # a probe of a running server: no key, no database
            healthcheck(args.host or settings.host, args.port or settings.port)
            return
        settings = ensure_secret_key(settings)
    except ValidationError as exc:
        sys.exit(f"ssehub: invalid configuration\n{_problems(exc)}")
    except KeyFileError as exc:
        sys.exit(f"ssehub: {exc}")
    from app.startup import CannotStart

    try:
        with database(settings) as settings:
            if args.command == "serve":
                host, port = args.host or settings.host, args.port or settings.port
                serve(settings, host, port, args.workers)
            elif args.command == "migrate":
                migrate(settings)
            elif args.command == "api-key":
                create_api_key(settings, args.name, args.publish)
            elif args.command == "grant-publisher":
                grant_publisher(settings, args.role)
            else:
                create_admin(settings, args.username)
    except CannotStart as exc:
        sys.exit(f"ssehub: {exc}")
    except (OSError, DBAPIError) as exc:
        # Reached only before serving starts (migrate, admin bootstrap): a
        # database that is down or misnamed deserves one line, not a traceback.
        message = getattr(exc, "orig", None) or exc
        sys.exit(f"ssehub: cannot use the database: {message}")


if __name__ == "__main__":
    main()
