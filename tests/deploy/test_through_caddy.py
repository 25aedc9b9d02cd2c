"""A browser through Caddy, against docker-compose.yml's stack as .ci/containers.sh runs it.

.ci/containers.sh brings the stack up (Postgres, two instances, Caddy) and
runs this file with where it is:

- ``DEPLOY_URL``: Caddy, ``https://localhost:PORT``;
- ``DEPLOY_CA``: Caddy's root certificate (the test's own requests verify
  against it; Chromium is told to accept Caddy's certificate);
- ``DEPLOY_ADMIN_PASSWORD``: the password of the stack's admin ``admin``;
- ``DEPLOY_INSTANCES``: the two instances' container names, for ``podman``.

Without them, or with nothing answering there, every test here fails: it
proves that a deployment works, and one that is not there proves nothing.
Plain ``make test`` does not collect this directory (``--ignore=tests/deploy``
in pyproject's pytest options); naming the file runs it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.support import auth
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS

WAIT_MS = 30_000
STREAMS_ON_ONE_PAGE = 20  # HTTP/1.1 allows a browser 6 connections per origin


@dataclass
class Stack:
    url: str
    tls: ssl.SSLContext  # trusts Caddy's internal CA
    instances: list[str]
    admin: dict[str, str]

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.tls, timeout=30)

    def post(self, path: str, retry_on: tuple[int, ...], **kwargs: Any) -> httpx.Response:
        """POST through Caddy, the answers in ``retry_on`` retried for up to 30 s:
        a 503 ("retry shortly") from an instance whose database connections are
        still warming up, a 502 while an instance is going away."""
        deadline = time.monotonic() + 30
        with self.http() as http:
            while True:
                r = http.post(path, **kwargs)
                if r.status_code not in retry_on or time.monotonic() > deadline:
                    return r
                time.sleep(0.5)

    def channel(self) -> str:
        """A new channel (a retried create that already landed answers 409)."""
        name = f"deploy-{uuid.uuid4().hex[:8]}"
        r = self.post("/channels", (502, 503), json={"name": name}, headers=self.admin)
        assert r.status_code in (201, 409), r.text
        return name

    def publish(self, channel: str, n: int) -> int:
        """One event; its idempotency key makes a retry store it once."""
        r = self.post(
            f"/channels/{channel}/events",
            (502, 503),
            json={"type": "message", "data": {"n": n}},
            headers={**self.admin, "Idempotency-Key": f"{channel}-{n}"},
        )
        assert r.status_code in (200, 201), r.text
        event_id: int = r.json()["id"]
        return event_id

    def stream_url(self, channel: str, after: int) -> str:
        """A stream URL with a stream token."""
        r = self.post("/auth/stream-token", (503,), headers=self.admin)
        assert r.status_code == 200, r.text
        token = r.json()["stream_token"]
        return f"/channels/{channel}/stream?access_token={token}&last_event_id={after}"


def _podman(*args: str) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def streams_open(instance: str) -> int:
    """``ssehub_streams_open`` of one instance, read inside its container."""
    metrics = _podman(
        "exec",
        instance,
        "python",
        "-c",
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/metrics').read().decode())",
    )
    match = re.search(r"^ssehub_streams_open (\S+)$", metrics, re.MULTILINE)
    assert match, metrics
    return int(float(match[1]))


@pytest.fixture(scope="module")
def stack() -> Stack:
    names = ("DEPLOY_URL", "DEPLOY_CA", "DEPLOY_ADMIN_PASSWORD", "DEPLOY_INSTANCES")
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not set: .ci/containers.sh brings the stack up and runs this"
        )
    url = os.environ["DEPLOY_URL"]
    tls = ssl.create_default_context(cafile=os.environ["DEPLOY_CA"])
    try:
        ready = httpx.get(f"{url}/readyz", verify=tls, timeout=10)
    except (httpx.HTTPError, OSError) as exc:
        pytest.fail(f"the stack does not answer at {url}: {exc}")
    assert ready.status_code == 200, ready.text
    r = httpx.post(
        f"{url}/auth/token",
        data={"username": "admin", "password": os.environ["DEPLOY_ADMIN_PASSWORD"]},
        verify=tls,
    )
    assert r.status_code == 200, r.text
    instances = os.environ["DEPLOY_INSTANCES"].split(",")
    assert len(instances) == 2, instances
    return Stack(url, tls, instances, auth(r.json()["access_token"]))


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """One Playwright for the module: its sync API runs one at a time per thread."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (.ci/containers.sh installs it)"
    with sync_playwright() as pw:
        yield pw


def launch(playwright: Playwright, args: list[str]) -> Iterator[Browser]:
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Chromium as tests/e2e/test_browser.py runs it: QUIC off, so HTTP/2 it is."""
    yield from launch(playwright, CHROMIUM_ARGS)


def open_tab(browser: Browser, stack: Stack) -> Page:
    """A tab on the stack's page, its certificate from Caddy's internal CA accepted."""
    tab = browser.new_context(ignore_https_errors=True).new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.goto(f"{stack.url}/")
    return tab


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    tab = open_tab(browser, stack)
    yield tab
    tab.context.close()


def spki_hash(stack: Stack, name: str, port: int) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the certificate Caddy presents for
    ``name``: what Chromium's --ignore-certificate-errors-spki-list takes, the one
    way to have QUIC accept a certificate of a CA it does not know."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        stack.tls.wrap_socket(raw, server_hostname=name) as conn,
    ):
        der_cert = conn.getpeercert(binary_form=True)
    assert der_cert
    key = x509.load_der_x509_certificate(der_cert).public_key()
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture(scope="module")
def quic_browser(playwright: Playwright, stack: Stack) -> Iterator[Browser]:
    """Chromium told to speak HTTP/3 to Caddy from the first request (rather than
    after an Alt-Svc header): QUIC to the port Caddy publishes on 127.0.0.1."""
    parts = urlsplit(stack.url)
    assert parts.hostname and parts.port
    origin = f"{parts.hostname}:{parts.port}"
    args = [a for a in CHROMIUM_ARGS if a != "--disable-quic"] + [
        f"--origin-to-force-quic-on={origin}",
        f"--host-resolver-rules=MAP {parts.hostname} 127.0.0.1",
        f"--ignore-certificate-errors-spki-list={spki_hash(stack, parts.hostname, parts.port)}",
    ]
    yield from launch(playwright, args)


OPEN_STREAMS = """([url, n]) => {
    window.got = []; window.opens = [];
    for (let i = 0; i < n; i++) {
        const source = new EventSource(url);
        window.got.push([]); window.opens.push(0);
        source.onopen = () => { window.opens[i] += 1; };
        source.addEventListener("message", (e) => window.got[i].push(Number(e.lastEventId)));
    }
}"""


def open_streams(page: Page, stack: Stack, n: int) -> str:
    """A new channel with one event, and ``n`` EventSources on it from after that
    event, all open; ``window.got[i]`` collects the ids the i-th one receives.
    Returns the channel."""
    channel = stack.channel()
    start = stack.publish(channel, 0)
    page.evaluate(OPEN_STREAMS, [stack.stream_url(channel, start), n])
    page.wait_for_function(f"window.opens.filter(n => n > 0).length === {n}")
    return channel


def protocol(page: Page) -> str:
    """The protocol the page itself was loaded with: h2, h3 or http/1.1."""
    name: str = page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
    return name


def test_one_page_holds_twenty_event_sources_over_http2(page: Page, stack: Stack) -> None:
    """More streams than HTTP/1.1 allows per origin, all on one page, all live:
    they share HTTP/2 connections. Caddy spreads them over both instances, and
    an event published through Caddy reaches every one of them, once."""
    assert protocol(page) == "h2"
    channel = open_streams(page, stack, STREAMS_ON_ONE_PAGE)
    assert all(streams_open(name) > 0 for name in stack.instances)
    event = stack.publish(channel, 1)
    page.wait_for_function("window.got.every(ids => ids.length > 0)")
    time.sleep(0.5)  # room for a duplicate to show
    assert page.evaluate("window.got") == [[event]] * STREAMS_ON_ONE_PAGE


def test_a_stream_resumes_on_the_other_instance_when_its_own_stops(
    page: Page, stack: Stack
) -> None:
    """The instance holding the stream is stopped (SIGTERM: it ends its streams).
    The browser reconnects with Last-Event-ID through Caddy, which sends it to
    the instance still up: it gets what was published meanwhile, once each."""
    channel = open_streams(page, stack, 1)
    first = stack.publish(channel, 1)
    page.wait_for_function(f"window.got[0].includes({first})")
    # The streams of the tests before have ended: this one is the only one open.
    deadline = time.monotonic() + 30
    while (counts := [streams_open(name) for name in stack.instances]) and sum(counts) != 1:
        assert time.monotonic() < deadline, counts
        time.sleep(0.5)
    holder = stack.instances[counts.index(1)]
    try:
        _podman("stop", "-t", "10", holder)
        missed = [stack.publish(channel, n) for n in (2, 3)]
        page.wait_for_function(f"window.got[0].includes({missed[-1]})")
        assert page.evaluate("window.got[0]") == [first, *missed]
        assert page.evaluate("window.opens[0]") >= 2  # it did reconnect
        (other,) = set(stack.instances) - {holder}
        assert streams_open(other) == 1
    finally:
        _podman("start", holder)
        deadline = time.monotonic() + 90
        while subprocess.run(
            ["podman", "healthcheck", "run", holder], capture_output=True
        ).returncode:
            assert time.monotonic() < deadline, f"{holder} not healthy again"
            time.sleep(1)


def test_the_page_and_its_streams_work_over_http3(quic_browser: Browser, stack: Stack) -> None:
    """HTTP/3 as Caddy offers it: the page loads over QUIC and a stream delivers."""
    page = open_tab(quic_browser, stack)
    try:
        assert protocol(page) == "h3"
        channel = open_streams(page, stack, 1)
        event = stack.publish(channel, 1)
        page.wait_for_function(f"window.got[0].includes({event})")
        assert page.evaluate("window.got[0]") == [event]
    finally:
        page.context.close()
