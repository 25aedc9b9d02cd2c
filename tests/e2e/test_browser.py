"""The page at ``/`` in a real headless Chromium against real ``ssehub serve`` processes.

These prove what a browser user relies on: the page's EventSource sees events
published through the API, survives the server going away (the browser's own
reconnect with ``Last-Event-ID``), and renews its stream token on
``ssehub.expired``, each event shown exactly once and in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.support import ADMIN_PASSWORD, Api, Server, auth, make_admin, truncate_all

pytestmark = pytest.mark.browser

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


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    yield tab
    context.close()


class Hub:
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


def test_published_event_appears_on_the_page(
    page: Page, start_server: Callable[..., Server]
) -> None:
    hub = Hub(start_server())
    hub.channel("news")
    hub.user("alice")
    log_in_and_subscribe(page, hub.url, "alice", "news")
    first = hub.publish("news", 1)
    wait_for_ids(page, [first])
    assert '"n": 1' in page.locator(f'#event-log li[data-id="{first}"] pre').inner_text()


def test_events_published_while_the_server_was_down_arrive_once_each(
    page: Page, start_server: Callable[..., Server], database_url: str
) -> None:
    old = start_server(SSEHUB_HEARTBEAT_SECONDS="0.5")
    hub = Hub(old)
    hub.channel("news")
    hub.user("bob")
    renewals: list[str] = []
    page.on("request", lambda r: renewals.append(r.url) if "/auth/stream-token" in r.url else None)
    log_in_and_subscribe(page, hub.url, "bob", "news")
    before = hub.publish("news", 0)
    wait_for_ids(page, [before])

    old.stop()  # cuts the page's stream; EventSource keeps retrying the same URL
    page.wait_for_selector('#stream-state[data-state="reconnecting"]')
    new = Server(database_url, env={"SSEHUB_HEARTBEAT_SECONDS": "0.5"}, port=old.port).start()
    try:
        missed = [hub.publish("news", n) for n in range(1, 4)]
        page.wait_for_selector('#stream-state[data-state="live"]')
        after = hub.publish("news", 4)
        wait_for_ids(page, [before, *missed, after])
        # The browser's own reconnect (same URL, Last-Event-ID) did it, no new token.
        assert len(renewals) == 1
    finally:
        new.stop()


def test_the_page_renews_its_stream_token_after_expiry(
    page: Page, start_server: Callable[..., Server]
) -> None:
    hub = Hub(start_server(SSEHUB_STREAM_TOKEN_TTL_SECONDS="2"))
    hub.channel("news")
    hub.user("carol")
    log_in_and_subscribe(page, hub.url, "carol", "news")
    first = hub.publish("news", 0)
    wait_for_ids(page, [first])
    page.wait_for_selector('#event-log li[data-notice="ssehub.expired"]')
    after_expiry = [hub.publish("news", n) for n in range(1, 4)]
    page.wait_for_selector('#stream-state[data-state="live"]')
    later = hub.publish("news", 4)
    wait_for_ids(page, [first, *after_expiry, later])
    assert page.locator('#event-log li[data-notice="ssehub.expired"]').count() >= 1


def test_nothing_overflows_at_phone_width(
    browser: Browser, start_server: Callable[..., Server]
) -> None:
    hub = Hub(start_server())
    long_name = "a-channel-with-a-rather-long-name-for-a-phone-screen"
    hub.channel(long_name)
    hub.user("dave")
    context = browser.new_context(viewport={"width": 375, "height": 800})
    try:
        tab = context.new_page()
        tab.set_default_timeout(WAIT_MS)
        tab.goto(hub.url)
        assert tab.evaluate("document.documentElement.scrollWidth") <= 375
        log_in_and_subscribe(tab, hub.url, "dave", long_name)
        wait_for_ids(tab, [hub.publish(long_name, 1)])
        assert tab.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        context.close()
