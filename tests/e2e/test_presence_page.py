"""The page at ``/`` lists who is online, in a real headless Chromium: the
snapshot its stream gets, then each join and leave."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page

from tests.support import Server, SseStream, auth
from tests.support.browser import (
    PLAIN_HTTP,
    WAIT_MS,
    BrowserAdmin,
    browser,
    clean_db,
    log_in_and_subscribe,
)

pytestmark = pytest.mark.browser
__all__ = ["browser", "clean_db"]  # fixtures


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    yield tab
    context.close()


def online(page: Page, channel: str) -> str:
    return page.locator(f'#presence-list dd[data-channel="{channel}"]').inner_text()


def test_the_page_lists_who_is_online_and_follows_joins_and_leaves(
    page: Page, start_server: Callable[..., Server]
) -> None:
    srv = start_server(**PLAIN_HTTP, SSEHUB_PRESENCE_GRACE_SECONDS="1")
    hub = BrowserAdmin(srv)
    r = httpx.post(
        f"{hub.url}/channels", json={"name": "room", "presence": True}, headers=hub.admin
    )
    assert r.status_code == 201, r.text
    hub.user("alice")
    hub.user("bobby")
    token = httpx.post(f"{hub.url}/auth/stream-token", headers=auth(hub.login("bobby"))).json()[
        "stream_token"
    ]
    bobby = SseStream(f"{hub.url}/channels/room/stream?access_token={token}")
    try:
        bobby.wait_for(lambda s: bool(s.notices("ssehub.live")))
        log_in_and_subscribe(page, hub.url, "alice", "room")
        page.wait_for_function(
            "() => document.querySelector('#presence-list dd[data-channel=\"room\"]')"
            "?.textContent === 'alice, bobby'"
        )
        assert page.locator("#presence").is_visible()
    finally:
        bobby.close()
    page.wait_for_function(
        "() => document.querySelector('#presence-list dd[data-channel=\"room\"]')"
        "?.textContent === 'alice'"
    )
    assert online(page, "room") == "alice"
