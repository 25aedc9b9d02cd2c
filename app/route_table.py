"""The route table of the hot URLs: which endpoint a request is for, and its body limit.

One parse per request, read by both layers in front of FastAPI: the hot-path
dispatcher (``app.hotpaths``), which serves the hot endpoints itself, and the
body limit (``app.limits.BodyLimit``), which bounds every body before any
route reads it. So the two can never disagree about what a URL is: a path the
dispatcher serves as a batch is the path whose body may be a batch's size.

The path is ``scope["path"]``: already percent-decoded by the server, so
``%2F`` in a channel name is a ``/`` here, and such a URL is no hot route
(FastAPI then answers it as it would). Exact segments only: a trailing slash
or an empty channel name is no hot route either, and FastAPI answers it (its
redirect or 404). Everything not in the table is ``Endpoint.OTHER``, FastAPI's,
with the JSON body limit. FastAPI still declares every route, for OpenAPI.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from app.config import Settings

KIB = 1024
FORM_BODY_BYTES = 16 * KIB  # the login form
ENVELOPE_BYTES = 16 * KIB  # a JSON body: room around one event's data


class Endpoint(enum.Enum):
    """What a request is for, as far as the layers in front of FastAPI care."""

    PUBLISH = "POST /channels/{name}/events"
    PUBLISH_BATCH = "POST /channels/{name}/events/batch"
    STREAM_CHANNEL = "GET /channels/{name}/stream"
    STREAM_SUBSCRIPTIONS = "GET /stream"
    LOGIN = "POST /auth/token"  # not hot; only its body (a form) is smaller
    OTHER = "anything else"  # FastAPI's


HOT = frozenset(
    {
        Endpoint.PUBLISH,
        Endpoint.PUBLISH_BATCH,
        Endpoint.STREAM_CHANNEL,
        Endpoint.STREAM_SUBSCRIPTIONS,
    }
)
# A stream's body is never read, so its request skips the body limit.
STREAMS = frozenset({Endpoint.STREAM_CHANNEL, Endpoint.STREAM_SUBSCRIPTIONS})


@dataclass(frozen=True, slots=True)
class Route:
    """A parsed request line: the endpoint and the path's ``{name}`` ("" if none)."""

    endpoint: Endpoint
    name: str = ""

    @property
    def hot(self) -> bool:
        """Whether ``app.hotpaths`` serves it (outside a ``root_path``)."""
        return self.endpoint in HOT

    @property
    def stream(self) -> bool:
        return self.endpoint in STREAMS

    def body_limit(self, settings: Settings) -> int:
        """The most bytes its body may have (README "Limits and abuse")."""
        if self.endpoint is Endpoint.PUBLISH_BATCH:
            return settings.max_batch_bytes
        if self.endpoint is Endpoint.LOGIN:
            return FORM_BODY_BYTES
        return settings.max_event_bytes + ENVELOPE_BYTES


OTHER = Route(Endpoint.OTHER)
_STREAM_SUBSCRIPTIONS = Route(Endpoint.STREAM_SUBSCRIPTIONS)
_LOGIN = Route(Endpoint.LOGIN)
# By method, then the segments after "/channels/{name}/".
_CHANNEL_ROUTES: dict[str, dict[tuple[str, ...], Endpoint]] = {
    "POST": {("events",): Endpoint.PUBLISH, ("events", "batch"): Endpoint.PUBLISH_BATCH},
    "GET": {("stream",): Endpoint.STREAM_CHANNEL},
}


def parse_route(method: str, path: str) -> Route:
    """The route of a request: its method and its decoded path (``scope["path"]``)."""
    if path == "/stream":
        return _STREAM_SUBSCRIPTIONS if method == "GET" else OTHER
    if path == "/auth/token":
        return _LOGIN if method == "POST" else OTHER
    by_rest = _CHANNEL_ROUTES.get(method)
    if by_rest is None:
        return OTHER
    parts = path.split("/")
    # "", "channels", name, "events" | "stream" [, "batch"]
    if len(parts) < 4 or parts[1] != "channels" or not parts[2]:
        return OTHER
    endpoint = by_rest.get(tuple(parts[3:]))
    return OTHER if endpoint is None else Route(endpoint, parts[2])
