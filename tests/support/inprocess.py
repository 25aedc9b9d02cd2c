"""The app in the test's own process, for JSON endpoints where no socket matters.

``in_process(database_url, SSEHUB_...=...)`` builds the app with ``create_app``
and runs its whole lifespan (the runtime, the broker, the background loops)
inside Starlette's ``TestClient``; it yields an ``Api`` whose ``http`` calls the
app directly. It takes the same ``SSEHUB_*`` names and test defaults as a
``Server``, and reads the rest of the environment as a server does, so it runs
on the broker the suite runs on.

Not for streams: the TestClient buffers a response until it ends, so SSE and
anything that depends on a connection (body limits, timeouts, client
addresses) is tested against a real ``Server``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.support.api import Api
from tests.support.servers import SERVER_ENV


@contextmanager
def in_process(database_url: str, **env: str) -> Iterator[Api]:
    """The app on ``database_url`` with ``env`` over the test defaults, running
    until the block ends."""
    values = {**SERVER_ENV, "SSEHUB_DATABASE_URL": database_url, **env}
    settings = Settings(**{name.removeprefix("SSEHUB_").lower(): v for name, v in values.items()})
    with TestClient(create_app(settings)) as client:
        yield Api(str(client.base_url), http=client)
