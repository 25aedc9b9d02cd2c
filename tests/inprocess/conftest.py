"""In-process tests: the JSON endpoints, with the app in the test's own process
(``tests.support.inprocess``): no server to start, no socket, same database.

``api`` here is one in-process app per test worker, shared like the ``server``
of the other suites; a test that needs other settings opens its own with
``in_process(database_url, SSEHUB_...=...)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Api
from tests.support.inprocess import in_process


@pytest.fixture(scope="session")
def app_api(database_url: str) -> Iterator[Api]:
    with in_process(database_url) as api:
        yield api


@pytest.fixture
def api(app_api: Api) -> Api:
    return app_api
