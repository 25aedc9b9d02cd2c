"""The route table of the hot URLs (``app.route_table``), in process: what each
request line parses to, the body limit it gets, and that FastAPI declares every
route the table serves outside it (so OpenAPI describes what is served)."""

from __future__ import annotations

import secrets

import pytest

from app.config import Settings
from app.hotpaths import HANDLERS, HotPaths
from app.main import create_app
from app.route_table import (
    ENVELOPE_BYTES,
    FORM_BODY_BYTES,
    HOT,
    STREAMS,
    Endpoint,
    Route,
    parse_route,
)

SETTINGS = Settings(
    database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/unused",
    secret_key=secrets.token_urlsafe(48),
    max_event_bytes=1000,
    max_batch_bytes=50_000,
)


@pytest.mark.parametrize(
    ("method", "path", "endpoint", "name"),
    [
        ("POST", "/channels/news/events", Endpoint.PUBLISH, "news"),
        ("POST", "/channels/news/events/batch", Endpoint.PUBLISH_BATCH, "news"),
        ("GET", "/channels/news/stream", Endpoint.STREAM_CHANNEL, "news"),
        ("GET", "/stream", Endpoint.STREAM_SUBSCRIPTIONS, ""),
        ("POST", "/auth/token", Endpoint.LOGIN, ""),
        # Names as the server hands them over, already percent-decoded.
        ("POST", "/channels/@alice/events", Endpoint.PUBLISH, "@alice"),
        ("GET", "/channels/caf\u00e9 au lait/stream", Endpoint.STREAM_CHANNEL, "caf\u00e9 au lait"),
        ("POST", "/channels/../events", Endpoint.PUBLISH, ".."),
    ],
)
def test_hot_urls_parse_to_their_endpoint_and_name(
    method: str, path: str, endpoint: Endpoint, name: str
) -> None:
    assert parse_route(method, path) == Route(endpoint, name)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/channels/news/events"),  # history: FastAPI's
        ("PUT", "/channels/news/events"),  # FastAPI's 405
        ("POST", "/channels/news/stream"),
        ("HEAD", "/stream"),
        ("POST", "/stream"),
        ("GET", "/auth/token"),
        ("POST", "/channels/news/events/"),  # trailing slash: FastAPI's answer
        ("GET", "/channels/news/stream/"),
        ("GET", "/stream/"),
        ("POST", "/channels//events"),  # no name
        ("POST", "/channels//events/batch"),
        # "/channels/a%2Fb/events" decoded: a name with "/" is no channel route.
        ("POST", "/channels/a/b/events"),
        ("POST", "/channels/news/events/batch/more"),
        ("POST", "/channel/news/events"),
        ("POST", "/api/channels/news/events"),  # under a root_path the path carries it
        ("POST", "/users/alice/events"),
        ("GET", "/"),
        ("GET", ""),
    ],
)
def test_everything_else_is_fastapis(method: str, path: str) -> None:
    route = parse_route(method, path)
    assert route.endpoint is Endpoint.OTHER and not route.hot and not route.stream


def test_body_limit_comes_with_the_route() -> None:
    json_limit = SETTINGS.max_event_bytes + ENVELOPE_BYTES
    limits = {
        ("POST", "/channels/news/events/batch"): SETTINGS.max_batch_bytes,
        ("POST", "/channels/news/events"): json_limit,
        ("POST", "/auth/token"): FORM_BODY_BYTES,
        ("POST", "/auth/register"): json_limit,
        ("POST", "/users/alice/events"): json_limit,
        # The batch limit belongs to the batch endpoint only.
        ("POST", "/channels/news/events/batch/"): json_limit,
        ("PUT", "/channels/news/events/batch"): json_limit,
    }
    for (method, path), limit in limits.items():
        assert parse_route(method, path).body_limit(SETTINGS) == limit, (method, path)


def test_hot_and_stream_sets() -> None:
    assert {e for e in Endpoint if parse_route(*_line(e)).hot} == HOT
    assert STREAMS < HOT
    assert Endpoint.LOGIN not in HOT and Endpoint.OTHER not in HOT


def test_the_dispatcher_serves_exactly_the_hot_routes() -> None:
    assert set(HANDLERS) == HOT


def test_openapi_declares_every_route_of_the_table() -> None:
    """The table's URLs are FastAPI's own routes: OpenAPI describes, and the
    fallback under a root_path serves, exactly what the dispatcher serves."""
    app = create_app(SETTINGS)
    assert isinstance(app, HotPaths)
    paths = app.app.openapi()["paths"]
    declared = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    for endpoint in Endpoint:
        if endpoint is not Endpoint.OTHER:
            method, template = endpoint.value.split(" ")
            assert (method, template) in declared, endpoint


def _line(endpoint: Endpoint) -> tuple[str, str]:
    """A request line for an endpoint of the table, with a channel named "news"."""
    if endpoint is Endpoint.OTHER:
        return "GET", "/healthz"
    method, template = endpoint.value.split(" ")
    return method, template.replace("{name}", "news")


def test_each_template_parses_back_to_its_endpoint() -> None:
    for endpoint in Endpoint:
        route = parse_route(*_line(endpoint))
        assert route.endpoint is endpoint
        assert route.name == ("news" if "{name}" in endpoint.value else "")
