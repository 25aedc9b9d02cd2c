"""Test plumbing shared by every suite: databases, real server processes, API helpers.

Everything here talks to real parts: a real Postgres (``SSEHUB_TEST_DATABASE_URL``
or the embedded one), ``ssehub serve`` running as a subprocess on a free port,
reached over a socket, and ``nats-server``. One module per part:

- ``db``: test databases (made, migrated, reset, queried);
- ``servers``: ``ssehub serve`` processes and the CLI;
- ``api``: the HTTP API as tests call it (``Api``, ``Hubs``), history, metrics;
- ``sse``: a raw-socket SSE client (``SseStream``);
- ``nats``: ``nats-server`` processes and a raw NATS client;
- ``proxies``: TCP proxies that cut, stall or record connections;
- ``idp``: a fake identity provider serving a JWKS;
- ``wait``: ``wait_until`` and ``eventually`` (async), polling an observable
  instead of sleeping;
- ``roles``: real database roles, and the attacker that plants shadows in ``public``;
- ``chaos`` and ``browser``: the chaos run and the Playwright helpers, imported
  from their own modules by the tests that use them.
"""

from tests.support.api import (
    Api,
    Hubs,
    auth,
    broker_events,
    counter_by_label,
    metric,
    read_history,
)
from tests.support.db import (
    ADMIN_PASSWORD,
    TABLES,
    Db,
    as_role,
    beside_a_server,
    create_database,
    drop_database,
    make_admin,
    migrated_database,
    postgres_address,
    reset_database,
    sql,
    truncate_all,
    unique_name,
    with_database,
)
from tests.support.nats import NATS_SERVER, NatsServer, RawNatsClient
from tests.support.proxies import CuttableProxy, RecordingProxy, TcpProxy
from tests.support.servers import ROOT, TEST_SECRET, Server, free_port, run_cli
from tests.support.sse import Frame, SseStream
from tests.support.wait import eventually, wait_until

__all__ = [
    "ADMIN_PASSWORD",
    "NATS_SERVER",
    "ROOT",
    "TABLES",
    "TEST_SECRET",
    "Api",
    "CuttableProxy",
    "Db",
    "Frame",
    "Hubs",
    "NatsServer",
    "RawNatsClient",
    "RecordingProxy",
    "Server",
    "SseStream",
    "TcpProxy",
    "as_role",
    "auth",
    "beside_a_server",
    "broker_events",
    "counter_by_label",
    "create_database",
    "drop_database",
    "eventually",
    "free_port",
    "make_admin",
    "metric",
    "migrated_database",
    "postgres_address",
    "read_history",
    "reset_database",
    "run_cli",
    "sql",
    "truncate_all",
    "unique_name",
    "wait_until",
    "with_database",
]
