"""The HTTP API as tests call it: a client with the usual calls, history, metrics."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import httpx

from tests.support.db import ADMIN_PASSWORD
from tests.support.sse import SseStream


class Api:
    """A thin httpx client with the calls every test needs."""

    def __init__(self, base_url: str, http: httpx.Client | None = None) -> None:
        self.base_url = base_url
        self.http = http or httpx.Client(base_url=base_url, timeout=30)

    def register(self, username: str, password: str = "password-123") -> httpx.Response:
        return self.http.post("/auth/register", json={"username": username, "password": password})

    def login(self, username: str, password: str = "password-123") -> str:
        r = self.http.post("/auth/token", data={"username": username, "password": password})
        assert r.status_code == 200, r.text
        token: str = r.json()["access_token"]
        return token

    def user(self, username: str, password: str = "password-123") -> dict[str, str]:
        """Register ``username`` and return its auth headers."""
        r = self.register(username, password)
        assert r.status_code == 201, r.text
        return auth(self.login(username, password))

    def admin(self) -> dict[str, str]:
        return auth(self.login("admin", ADMIN_PASSWORD))


def read_history(base: str, headers: dict[str, str], channel: str) -> list[dict[str, Any]]:
    """Every retained event of ``channel``, following ``next_after`` to the end."""
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        r = httpx.get(
            f"{base}/channels/{channel}/events",
            params={"after": after, "limit": 1000},
            headers=headers,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        page = r.json()
        events += page["events"]
        if page["next_after"] is None:
            return events
        after = page["next_after"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def metric(base: str, name: str) -> float:
    """The value of an unlabelled metric on one instance's ``/metrics``."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"no {name} in /metrics"
    return float(found.group(1))


def counter_by_label(base: str, name: str, label: str) -> defaultdict[str, float]:
    """A counter of one instance's ``/metrics`` with one label, by the label's
    value (0 for a value it does not show)."""
    counts: defaultdict[str, float] = defaultdict(float)
    for value, count in re.findall(
        rf'^{name}\{{{label}="(\w+)"\}} (\S+)$',
        httpx.get(f"{base}/metrics", timeout=10).text,
        re.MULTILINE,
    ):
        counts[value] = float(count)
    return counts


def broker_events(base: str) -> dict[str, float]:
    """``ssehub_broker_events_total`` of one instance, by source (``app.metrics``)."""
    return counter_by_label(base, "ssehub_broker_events_total", "source")


class Hubs:
    """Admin actions and stream opening against one base URL."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.admin = api.admin()
        self.opened: list[SseStream] = []

    def channel(self, name: str, **fields: Any) -> None:
        r = self.api.http.post("/channels", json={"name": name, **fields}, headers=self.admin)
        assert r.status_code == 201, r.text

    def publish(
        self, channel: str, data: Any = None, type_: str = "message", base: str | None = None
    ) -> int:
        url = f"{base or self.api.base_url}/channels/{channel}/events"
        r = httpx.post(url, json={"type": type_, "data": data}, headers=self.admin, timeout=30)
        assert r.status_code == 201, r.text
        event_id: int = r.json()["id"]
        return event_id

    def stream_token(self, headers: dict[str, str]) -> str:
        r = self.api.http.post("/auth/stream-token", headers=headers)
        assert r.status_code == 200, r.text
        token: str = r.json()["stream_token"]
        return token

    def open(self, path: str, token: str, base: str | None = None, **kwargs: Any) -> SseStream:
        """Open ``path`` with ``?access_token=`` (``path`` may carry its own query)."""
        sep = "&" if "?" in path else "?"
        stream = SseStream(f"{base or self.api.base_url}{path}{sep}access_token={token}", **kwargs)
        self.opened.append(stream)
        return stream

    def close_all(self) -> None:
        for stream in self.opened:
            stream.close()
