"""The page at ``/`` in a real headless Chromium against real ``ssehub serve`` processes.

These prove what a browser user relies on: the page's EventSource sees events
published through the API, survives the server going away (the browser's own
reconnect with ``Last-Event-ID``), and renews its stream cookie on
``ssehub.expired``, each event shown exactly once and in order. The page
streams with the ``ssehub_stream`` cookie: no request it makes has a token in
its URL. ``ssehub.js`` does the same for a page on another origin listed in
``SSEHUB_CORS_ORIGINS``.

The servers run on plain http://127.0.0.1 and so set ``SSEHUB_COOKIE_SECURE=false``,
as the README tells developers to; the first test keeps the default (Secure)
and shows that Chromium treats 127.0.0.1 as a secure origin.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

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
PLAIN_HTTP = {"SSEHUB_COOKIE_SECURE": "false"}  # development over http://, as the README says


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


class Sent(NamedTuple):
    method: str
    url: str
    resource_type: str


@pytest.fixture
def sent() -> list[Sent]:
    """Every request the ``page`` fixture's tab makes, in order."""
    return []


def new_tab(context: BrowserContext, sent: list[Sent]) -> Page:
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.on("request", lambda r: sent.append(Sent(r.method, r.url, r.resource_type)))
    return tab


@pytest.fixture
def page(browser: Browser, sent: list[Sent]) -> Iterator[Page]:
    context = browser.new_context()
    yield new_tab(context, sent)
    context.close()


def assert_no_token_in_urls(sent: list[Sent]) -> None:
    """The page streamed (EventSource requests were made) and no URL it requested
    carries a token: the access token stays in sessionStorage, the stream token
    in the HttpOnly cookie."""
    assert [r for r in sent if r.resource_type == "eventsource"], "no EventSource was opened"
    assert [r.url for r in sent if "access_token" in r.url] == []


def cookie_posts(sent: list[Sent]) -> int:
    return sum(1 for r in sent if r.method == "POST" and r.url.endswith("/auth/stream-cookie"))


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
    page: Page, sent: list[Sent], start_server: Callable[..., Server]
) -> None:
    """Also: the cookie's round trip. The server keeps the default Secure cookie:
    Chromium stores and sends it on http://127.0.0.1 all the same (a
    "potentially trustworthy" origin); logging out clears it."""
    hub = Hub(start_server())
    hub.channel("news")
    hub.user("alice")
    log_in_and_subscribe(page, hub.url, "alice", "news")
    first = hub.publish("news", 1)
    wait_for_ids(page, [first])
    assert '"n": 1' in page.locator(f'#event-log li[data-id="{first}"] pre').inner_text()
    (cookie,) = page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["secure"]) == ("ssehub_stream", True, True)
    assert cookie_posts(sent) == 1
    assert_no_token_in_urls(sent)

    with page.expect_response(
        lambda r: r.request.method == "DELETE" and r.url.endswith("/auth/stream-cookie")
    ) as cleared:
        page.get_by_role("button", name="Log out").click()
    assert cleared.value.status == 204
    assert page.context.cookies() == []


def test_events_published_while_the_server_was_down_arrive_once_each(
    page: Page, sent: list[Sent], start_server: Callable[..., Server], database_url: str
) -> None:
    env = {"SSEHUB_HEARTBEAT_SECONDS": "0.5", **PLAIN_HTTP}
    old = start_server(**env)
    hub = Hub(old)
    hub.channel("news")
    hub.user("bob")
    log_in_and_subscribe(page, hub.url, "bob", "news")
    before = hub.publish("news", 0)
    wait_for_ids(page, [before])

    old.stop()  # cuts the page's stream; EventSource keeps retrying the same URL
    page.wait_for_selector('#stream-state[data-state="reconnecting"]')
    new = Server(database_url, env=env, port=old.port).start()
    try:
        missed = [hub.publish("news", n) for n in range(1, 4)]
        page.wait_for_selector('#stream-state[data-state="live"]')
        after = hub.publish("news", 4)
        wait_for_ids(page, [before, *missed, after])
        # The browser's own reconnect (same URL, Last-Event-ID, the same cookie)
        # did it: the cookie was set once, at login.
        assert cookie_posts(sent) == 1
        assert_no_token_in_urls(sent)
    finally:
        new.stop()


def test_the_page_renews_its_stream_cookie_after_expiry(
    page: Page, sent: list[Sent], start_server: Callable[..., Server]
) -> None:
    hub = Hub(start_server(SSEHUB_STREAM_TOKEN_TTL_SECONDS="2", **PLAIN_HTTP))
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
    assert cookie_posts(sent) >= 2  # at login, then renewed on expiry
    assert_no_token_in_urls(sent)


def test_nothing_overflows_at_phone_width(
    browser: Browser, sent: list[Sent], start_server: Callable[..., Server]
) -> None:
    hub = Hub(start_server(**PLAIN_HTTP))
    long_name = "a-channel-with-a-rather-long-name-for-a-phone-screen"
    hub.channel(long_name)
    hub.user("dave")
    context = browser.new_context(viewport={"width": 375, "height": 800})
    try:
        tab = new_tab(context, sent)
        tab.goto(hub.url)
        assert tab.evaluate("document.documentElement.scrollWidth") <= 375
        log_in_and_subscribe(tab, hub.url, "dave", long_name)
        wait_for_ids(tab, [hub.publish(long_name, 1)])
        assert tab.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        context.close()
    assert_no_token_in_urls(sent)


# A page of another origin (same site: 127.0.0.1 on another port) that uses
# ssehub.js as served by the hub, the way the README's recipe says.
OTHER_ORIGIN_SCRIPT = """async ([hub, username, password]) => {
  const { openStream } = await import(hub + '/ssehub.js');
  const login = await fetch(hub + '/auth/token', {
    method: 'POST', body: new URLSearchParams({ username, password }) });
  const { access_token } = await login.json();
  window.got = [];
  window.stream = openStream({
    path: hub + '/stream',
    lastEventId: 2 ** 50,  // above every issued id, as after a database restore
    renewCookie: () => fetch(hub + '/auth/stream-cookie', {
      method: 'POST', credentials: 'include', headers: { Authorization: 'Bearer ' + access_token } }),
    onEvent: (event) => window.got.push([event.id, event.channel]),
    onNotice: (type, data) => { if (type === 'ssehub.reset') window.reset = data; },
    onState: (state) => { window.state = state; },
  });
}"""


class _BlankPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>another app</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def other_origin() -> Iterator[str]:
    """A real page server on 127.0.0.1 (a page fulfilled by Playwright would count as
    public, and Chromium's Local Network Access would block its calls to loopback)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _BlankPage)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_ssehub_js_streams_with_the_cookie_for_a_page_on_another_origin(
    page: Page, sent: list[Sent], other_origin: str, start_server: Callable[..., Server]
) -> None:
    """Also: starting above every issued id, ssehub.js follows ``ssehub.reset``
    down to the server's position instead of dropping every later event as seen."""
    hub = Hub(start_server(SSEHUB_CORS_ORIGINS=other_origin, **PLAIN_HTTP))
    hub.channel("news")
    hub.user("erin")
    erin = auth(Api(hub.url).login("erin", USER_PASSWORD))
    assert httpx.put(f"{hub.url}/me/subscriptions/news", headers=erin).status_code == 201
    page.goto(f"{other_origin}/")
    page.evaluate(OTHER_ORIGIN_SCRIPT, [hub.url, "erin", USER_PASSWORD])
    page.wait_for_function("window.state === 'live'")
    news = hub.publish("news", 1)
    r = httpx.post(f"{hub.url}/users/erin/events", json={"data": 2}, headers=hub.admin)
    assert r.status_code == 201, r.text
    personal = r.json()["id"]
    page.wait_for_function("window.got.length >= 2")
    assert page.evaluate("window.got") == [[news, "news"], [personal, "@erin"]]
    assert page.evaluate("window.reset.last_event_id") < news
    streams = [r.url for r in sent if r.resource_type == "eventsource"]
    assert streams == [f"{hub.url}/stream?last_event_id={2**50}"]
    assert cookie_posts(sent) == 1
    assert_no_token_in_urls(sent)
