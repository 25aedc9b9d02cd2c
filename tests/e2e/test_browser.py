"""The page at ``/`` in a real headless Chromium against real ``ssehub serve`` processes.

These prove what a browser user relies on: the page, through the browser
client (``/ssehub-client.js``), sees events published through the API,
survives the server going away (reconnecting with backoff from its last id),
and says so when its login expires, each event shown exactly once and in
order. Its access token goes in the stream's ``Authorization`` header: no
request it makes has a token in its URL. The same client streams with the
``ssehub_stream`` cookie for a page on another origin listed in
``SSEHUB_CORS_ORIGINS``. Sharing one stream between tabs is
``test_shared_stream.py``'s.

The servers run on plain http://127.0.0.1 and so set ``SSEHUB_COOKIE_SECURE=false``,
as the README tells developers to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from tests.support import Api, Server, auth
from tests.support.browser import (
    PLAIN_HTTP,
    USER_PASSWORD,
    WAIT_MS,
    BrowserAdmin,
    browser,
    clean_db,
    log_in_and_subscribe,
    wait_for_ids,
    wait_for_streams,
)

pytestmark = pytest.mark.browser
__all__ = ["browser", "clean_db"]  # fixtures


class Sent(NamedTuple):
    method: str
    url: str
    authorized: bool  # an Authorization header


@pytest.fixture
def sent() -> list[Sent]:
    """Every request the ``page`` fixture's tab makes, in order."""
    return []


def new_tab(context: BrowserContext, sent: list[Sent]) -> Page:
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.on(
        "request",
        lambda r: sent.append(Sent(r.method, r.url, "authorization" in r.headers)),
    )
    return tab


@pytest.fixture
def page(browser: Browser, sent: list[Sent]) -> Iterator[Page]:
    context = browser.new_context()
    yield new_tab(context, sent)
    context.close()


def streams(sent: list[Sent]) -> list[Sent]:
    return [r for r in sent if r.url.split("?")[0].endswith("/stream")]


def assert_no_token_in_urls(sent: list[Sent]) -> None:
    """The page streamed, and no URL it requested carries a token: the access token
    stays in sessionStorage and goes in the stream's Authorization header."""
    assert streams(sent), "no stream was opened"
    assert all(r.authorized for r in streams(sent))
    assert [r.url for r in sent if "access_token" in r.url] == []


def test_published_event_appears_on_the_page(
    page: Page, sent: list[Sent], start_server: Callable[..., Server]
) -> None:
    """Also: logging out closes the page's stream."""
    hub = BrowserAdmin(start_server())
    hub.channel("news")
    hub.user("alice")
    log_in_and_subscribe(page, hub.url, "alice", "news")
    first = hub.publish("news", 1)
    wait_for_ids(page, [first])
    assert '"n": 1' in page.locator(f'#event-log li[data-id="{first}"] pre').inner_text()
    assert page.locator("#stream-state").get_attribute("data-role") == "leader"
    assert_no_token_in_urls(sent)
    wait_for_streams(hub, 1)

    page.get_by_role("button", name="Log out").click()
    wait_for_streams(hub, 0)


def test_events_published_while_the_server_was_down_arrive_once_each(
    page: Page, sent: list[Sent], start_server: Callable[..., Server], database_url: str
) -> None:
    env = {"SSEHUB_HEARTBEAT_SECONDS": "0.5", **PLAIN_HTTP}
    old = start_server(**env)
    hub = BrowserAdmin(old)
    hub.channel("news")
    hub.user("bob")
    log_in_and_subscribe(page, hub.url, "bob", "news")
    before = hub.publish("news", 0)
    wait_for_ids(page, [before])

    old.stop()  # cuts the page's stream; the client retries with backoff
    page.wait_for_selector('#stream-state[data-state="reconnecting"]')
    new = Server(database_url, env=env, port=old.port).start()
    try:
        missed = [hub.publish("news", n) for n in range(1, 4)]
        page.wait_for_selector('#stream-state[data-state="live"]')
        after = hub.publish("news", 4)
        wait_for_ids(page, [before, *missed, after])
        # It resumed from the last id it had shown.
        assert f"last_event_id={before}" in streams(sent)[-1].url
        assert_no_token_in_urls(sent)
    finally:
        new.stop()


def test_the_page_logs_out_when_its_login_expires(
    page: Page, start_server: Callable[..., Server]
) -> None:
    """The server ends the stream with ``ssehub.expired``; the page's token is its
    login's, refused from then on (401): it says so and shows the login form."""
    hub = BrowserAdmin(start_server(SSEHUB_ACCESS_TOKEN_TTL_SECONDS="3", **PLAIN_HTTP))
    hub.channel("news")
    hub.user("carol")
    log_in_and_subscribe(page, hub.url, "carol", "news")
    page.wait_for_selector("#login-panel:not([hidden])")
    assert "session expired" in page.locator("#login-message").inner_text()
    wait_for_streams(hub, 0)


def test_nothing_overflows_at_phone_width(
    browser: Browser, sent: list[Sent], start_server: Callable[..., Server]
) -> None:
    hub = BrowserAdmin(start_server(**PLAIN_HTTP))
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


# A page of another origin (same site: 127.0.0.1 on another port) that imports the
# client as served by the hub and streams with the stream cookie (no token).
OTHER_ORIGIN_SCRIPT = """async ([hub, username, password]) => {
  const { SsehubClient } = await import(hub + '/ssehub-client.js');
  const login = await fetch(hub + '/auth/token', {
    method: 'POST', body: new URLSearchParams({ username, password }) });
  const { access_token } = await login.json();
  const cookie = await fetch(hub + '/auth/stream-cookie', {
    method: 'POST', credentials: 'include', headers: { Authorization: 'Bearer ' + access_token } });
  if (cookie.status !== 204) throw new Error('stream cookie: ' + cookie.status);
  window.got = [];
  window.hub = new SsehubClient({
    url: hub,
    lastEventId: 2 ** 50,  // above every issued id, as after a database restore
  });
  window.hub.on('event', (event) => window.got.push([event.id, event.channel]));
  window.hub.on('notice', ({ type, data }) => { if (type === 'ssehub.reset') window.reset = data; });
  window.hub.on('status', (status) => { window.state = status; });
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


def test_the_served_client_streams_with_the_cookie_for_a_page_on_another_origin(
    page: Page, sent: list[Sent], other_origin: str, start_server: Callable[..., Server]
) -> None:
    """Also: starting above every issued id, the client follows ``ssehub.reset``
    down to the server's position instead of dropping every later event as seen."""
    hub = BrowserAdmin(start_server(SSEHUB_CORS_ORIGINS=other_origin, **PLAIN_HTTP))
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
    assert [r.url for r in streams(sent)] == [f"{hub.url}/stream?last_event_id={2**50}"]
    assert not any(r.authorized for r in streams(sent))  # the cookie, no token
    assert [r.url for r in sent if "access_token" in r.url] == []
