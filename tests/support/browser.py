"""What the browser tests share: Debian's Chromium driven by Playwright, and a hub's admin side.

Playwright's own browser download does not work here: the tests launch
``/usr/bin/chromium`` and are skipped, with that reason, where it is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.support import (
    ADMIN_PASSWORD,
    Api,
    Server,
    auth,
    make_admin,
    metric,
    truncate_all,
    wait_until,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WAIT_MS = 15_000
USER_PASSWORD = "password-123"
PLAIN_HTTP = {"SSEHUB_COOKIE_SECURE": "false"}  # development over http://, as the README says
TOKEN_KEY = "ssehub.access_token"  # where the page keeps its login (app/static/app.js)


@pytest.fixture(autouse=True)
def clean_db(database_url: str) -> None:
    """conftest's clean_db, run on a worker thread: Playwright's sync API keeps an
    event loop running on this one, and the helpers use ``asyncio.run``."""

    def clean() -> None:
        truncate_all(database_url)
        make_admin(database_url)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(clean).result()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


class BrowserAdmin:
    """Admin calls against one server (its URL may change when it is restarted)."""

    def __init__(self, server: Server) -> None:
        self.url = server.url
        self.admin = auth(Api(server.url).login("admin", ADMIN_PASSWORD))

    def channel(self, name: str) -> None:
        r = httpx.post(f"{self.url}/channels", json={"name": name}, headers=self.admin)
        assert r.status_code == 201, r.text

    def user(self, username: str) -> None:
        r = httpx.post(
            f"{self.url}/auth/register", json={"username": username, "password": USER_PASSWORD}
        )
        assert r.status_code == 201, r.text

    def login(self, username: str) -> str:
        return Api(self.url).login(username, USER_PASSWORD)

    def subscribe(self, token: str, channel: str) -> None:
        r = httpx.put(f"{self.url}/me/subscriptions/{channel}", headers=auth(token))
        assert r.status_code == 201, r.text

    def publish(self, channel: str, n: int) -> int:
        r = httpx.post(
            f"{self.url}/channels/{channel}/events",
            json={"type": "message", "data": {"n": n}},
            headers=self.admin,
            timeout=30,
        )
        assert r.status_code == 201, r.text
        event_id: int = r.json()["id"]
        return event_id

    def publish_to_user(self, username: str, n: int) -> int:
        """An event on ``@username``, the user's personal channel."""
        r = httpx.post(
            f"{self.url}/users/{username}/events", json={"data": {"n": n}}, headers=self.admin
        )
        assert r.status_code == 201, r.text
        event_id: int = r.json()["id"]
        return event_id

    def streams_open(self) -> float:
        return metric(self.url, "ssehub_streams_open")


def log_in_and_subscribe(page: Page, url: str, username: str, channel: str) -> None:
    page.goto(url)
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(USER_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("button", name=f"Subscribe to {channel}").click()
    page.wait_for_selector(f'button[data-channel="{channel}"][aria-pressed="true"]')
    page.wait_for_selector('#stream-state[data-state="live"]')


def shown_ids(page: Page) -> list[int]:
    ids: list[str] = page.eval_on_selector_all(
        "#event-log li[data-id]", "els => els.map(e => e.dataset.id)"
    )
    return [int(i) for i in ids]


def wait_for_ids(page: Page, expected: list[int]) -> None:
    """Wait until the last expected id shows, then check the whole log: once each, in order."""
    page.wait_for_selector(f'#event-log li[data-id="{expected[-1]}"]')
    assert shown_ids(page) == expected


def wait_for_streams(hub: BrowserAdmin, count: int) -> None:
    """Poll /metrics until the server counts ``count`` open streams."""
    wait_until(lambda: hub.streams_open() == count, f"{count} open streams", WAIT_MS / 1000)
