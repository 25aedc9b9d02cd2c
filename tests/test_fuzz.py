"""Schema-driven fuzzing: every operation of ``/openapi.json``, as an admin and as a user.

schemathesis reads the OpenAPI of a live ``ssehub serve`` and sends each
operation generated requests, valid and invalid (the examples, coverage and
fuzzing phases), with an admin's token and then with an ordinary user's. Each
answer must be no server error (>= 500) and must agree with the schema: a
documented status code, a documented content type and headers, a body that
conforms (see ``CHECKS``). So this attacks both the app (a 500 for something a
client can send) and its OpenAPI (an error the contract promises but ``/docs``
hides).

The two stream endpoints never end: schemathesis reads an event stream until
its first event (``max-stream-events``) or the request timeout, then judges
what it got, so they are fuzzed like the rest.

Bounded and reproducible: a few dozen requests per operation, no deadline,
derandomized, a fixed seed: every run sends the same requests. The fuzzing
runs on a server of its own; when an operation that may write is done, the
data it made is deleted, so each operation starts from the same few seeded
channels and nothing piles up. The users ``admin`` and ``fuzzer`` are kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.support import ADMIN_PASSWORD, Api, Server, auth, beside_a_server

FUZZER = "fuzzer"
FUZZER_PASSWORD = "fuzzer-password-1"
PROTECTED_USERS = ("admin", FUZZER)
# Small enough that generated data crosses it, so the 413 path is fuzzed too.
MAX_EVENT_BYTES = 64
# Names the fuzzer may pick besides random ones, so that operations on an
# existing channel or user get past their 404: a public channel with history,
# a private one the user is not a member of.
KNOWN = {"name": ("news", "vip"), "username": (FUZZER, "admin", "nobody")}
# What must hold for every answer. Left out, and why:
# - allow_header_conformance: FastAPI's 405 names in ``Allow`` the methods of the
#   first route at a path only (OPTIONS /channels: "POST", not "GET, POST").
#   FastAPI's routing, not ours; no client of ssehub reads ``Allow``.
# - positive_data_acceptance: it judged a batch publish sent without its required
#   body a valid request (the 400 is right), and a valid name is still a 404 when
#   no such channel exists.
# - negative_data_rejection: the hook below replaces generated (possibly invalid)
#   names by known valid ones, so a case generated as invalid may not be.
# - the stateful ones (use_after_free, ensure_resource_availability, ...) need
#   the stateful phase, which this test does not run.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    unsupported_method,  # a method the schema does not list gets 405
    ignored_auth,  # a secured operation refuses the same request without a token
]
# The same requests every run: derandomized, and no example database to replay.
FUZZ_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis (4.32) names each operation's subtest through ``node._nodeid``,
    which pytest 9.2 no longer has (node ids moved to ``node._id``): without it the
    ``from_fixture`` loader fails before the first request. Harmless once fixed there."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.fixture(scope="module")
def fuzz_server(database_url: str) -> Iterator[Server]:
    """A server of its own: nothing the fuzzer does reaches the shared one."""
    srv = Server(database_url, env={"SSEHUB_MAX_EVENT_BYTES": str(MAX_EVENT_BYTES)}).start()
    try:
        yield srv
    finally:
        srv.stop()


def _with_known_names(params: dict[str, Any] | None) -> st.SearchStrategy[dict[str, Any] | None]:
    if not isinstance(params, dict):
        return st.just(params)
    known = {k: st.sampled_from(KNOWN[k]) for k in params if k in KNOWN}
    return st.fixed_dictionaries(known).map(lambda names: {**params, **names})


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> schemathesis.BaseSchema:
    """The live server's OpenAPI, with a fixed seed and streams read to their first event."""
    config = schemathesis.Config.from_dict({"seed": 20261125, "max-stream-events": 1})
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=config)

    @schema.hook
    def before_generate_path_parameters(
        _context: schemathesis.HookContext, strategy: st.SearchStrategy[dict[str, Any]]
    ) -> st.SearchStrategy[dict[str, Any]]:
        return st.one_of(strategy, strategy.flatmap(_with_known_names))

    return schema


class Fuzzing:
    """The fuzzed server's state: tokens, and the same seeded data for every operation."""

    def __init__(self, server: Server, database_url: str) -> None:
        self.server = server
        self.database_url = database_url
        self.api = Api(server.url)
        r = self.api.register(FUZZER, FUZZER_PASSWORD)
        assert r.status_code == 201, r.text
        self.tokens = {
            "admin": auth(self.api.login("admin", ADMIN_PASSWORD)),
            "user": auth(self.api.login(FUZZER, FUZZER_PASSWORD)),
        }
        self.operation: str | None = None
        self.changed = True  # the data is not (yet) the seeded data

    def prepare(self, case: Case) -> None:
        """The seeded data again when a new operation starts after one that could
        change it (reads leave it as it was); never let a case remove our own users."""
        if case.operation.label != self.operation:
            if self.changed:
                self.reset()
            self.operation = case.operation.label
            self.changed = case.method.upper() not in ("GET", "HEAD")
        params = case.path_parameters or {}
        ours = params.get("username") in PROTECTED_USERS
        if ours and case.path.startswith("/users/") and case.method.upper() in ("DELETE", "PATCH"):
            case.path_parameters = {**params, "username": "nobody"}

    def reset(self) -> None:
        asyncio.run(beside_a_server(self.database_url, self._forget_all_but_our_users))
        admin = self.tokens["admin"]
        for name, private in (("news", False), ("vip", True)):
            r = self.api.http.post(
                "/channels", json={"name": name, "private": private}, headers=admin
            )
            assert r.status_code == 201, r.text
            r = self.api.http.post(
                f"/channels/{name}/events/batch",
                json={"events": [{"data": i} for i in range(3)]},
                headers=admin,
            )
            assert r.status_code == 201, r.text
        r = self.api.http.put("/me/subscriptions/news", headers=self.tokens["user"])
        assert r.status_code == 201, r.text

    @staticmethod
    async def _forget_all_but_our_users(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "TRUNCATE idempotency_keys, events, subscriptions, channel_members, channels CASCADE"
        )
        await conn.execute("DELETE FROM users WHERE username <> ALL($1)", PROTECTED_USERS)

    def run(self, case: Case, role: str) -> None:
        self.prepare(case)
        case.call_and_validate(
            base_url=self.server.url, headers=self.tokens[role], checks=CHECKS, timeout=10
        )


@pytest.fixture
def fuzzing(fuzz_server: Server, database_url: str) -> Iterator[Fuzzing]:
    state = Fuzzing(fuzz_server, database_url)
    yield state
    state.api.http.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@FUZZ_SETTINGS
@schema.parametrize()
def test_fuzz_as_admin(case: Case, fuzzing: Fuzzing) -> None:
    """Every operation with an admin's token: no 5xx, nothing the schema does not declare."""
    fuzzing.run(case, "admin")


@FUZZ_SETTINGS
@schema.parametrize()
def test_fuzz_as_user(case: Case, fuzzing: Fuzzing) -> None:
    """Every operation with an ordinary user's token: the 403s and 404s of a user
    who may not administer and cannot see private channels must be declared too."""
    fuzzing.run(case, "user")
