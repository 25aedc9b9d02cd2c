"""The contract's limits, attacked over real sockets against a real ``ssehub serve``.

Each test names the attack it plays. Raw sockets where a client library would
refuse to misbehave (a head that never ends, a body that never ends), httpx
elsewhere.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support import Api, Server, metric, wait_until

KIB = 1024
MIB = 1024 * KIB
EVENT_LIMIT = 65536 + 16 * KIB  # default SSEHUB_MAX_EVENT_BYTES + 16 KiB


def connect(server: Server, timeout: float = 10) -> socket.socket:
    parts = urlsplit(server.url)
    assert parts.hostname and parts.port
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response read to its end (Content-Length) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` (what it sends is skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], deadline - time.monotonic())
        if readable:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
    return False


def head(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: ssehub.test", *headers, "", ""]
    return "\r\n".join(lines).encode()


def assert_json_refusal(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    assert status == expected, (status, body)
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body)["detail"]


def stream_until_answered(
    sock: socket.socket, first: bytes, chunks: Iterator[bytes]
) -> tuple[int, bytes]:
    """Send ``first`` and then ``chunks`` until the server answers; returns how
    many bytes were sent by then, and what had arrived."""
    sock.sendall(first)
    sent = 0
    for chunk in chunks:
        _, writable, _ = select.select([], [sock], [], 5)
        readable, _, _ = select.select([sock], [], [], 0)
        if readable or not writable:
            break
        try:
            sent += sock.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
    sock.settimeout(5)
    return sent, sock.recv(65536)


def server_rss(server: Server) -> int:
    """Resident memory of the server process, in bytes (workers=1: one process)."""
    assert server.process is not None
    with open(f"/proc/{server.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS")


# Bodies


def test_declared_2gb_body_is_refused_before_it_is_sent(server: Server) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(
            head(
                "/auth/register",
                "Content-Type: application/json",
                f"Content-Length: {2 * 1024 * MIB}",
                method="POST",
            )
        )
        status, headers, body = read_response(sock)
        assert time.monotonic() - started < 2
        assert_json_refusal(status, headers, body, 413)
        assert closed_by_peer(sock, timeout=2)


def test_chunked_body_that_never_ends_is_cut_at_the_limit(server: Server) -> None:
    """50 MB of chunked JSON to /auth/register: the 413 comes after the limit,
    long before the end, and the server does not buffer what it was sent."""
    piece = b"x" * (64 * KIB)
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    rss_before = server_rss(server)
    with connect(server) as sock:
        first = head(
            "/auth/register",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
            method="POST",
        )
        sent, answer = stream_until_answered(sock, first, iter([chunk] * 800))  # 50 MiB
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert sent < 20 * MIB, f"the 413 came after {sent} bytes"
    assert server_rss(server) - rss_before < 16 * MIB


def test_oversized_login_form_is_413(api: Api) -> None:
    form = {"username": "admin", "password": "p" * (16 * KIB)}
    r = api.http.post("/auth/token", data=form)
    assert_json_refusal(r.status_code, dict(r.headers), r.content, 413)
    r = api.http.post("/auth/token", data={"username": "admin", "password": "p" * 8000})
    assert r.status_code == 401  # under the limit: a wrong password, as before


def test_oversized_json_body_is_413_declared_or_chunked(api: Api) -> None:
    account = {"username": "mallory", "password": "p" * EVENT_LIMIT}
    r = api.http.post("/auth/register", json=account)
    assert_json_refusal(r.status_code, dict(r.headers), r.content, 413)

    def chunked() -> Iterator[bytes]:
        yield json.dumps(account).encode()

    r = api.http.post(
        "/auth/register", content=chunked(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert_json_refusal(r.status_code, dict(r.headers), r.content, 413)


def test_batch_past_max_batch_bytes_is_413(start_server: Callable[..., Server]) -> None:
    api = Api(start_server(SSEHUB_MAX_BATCH_BYTES="200000").url)
    admin = api.admin()
    assert api.http.post("/channels", json={"name": "news"}, headers=admin).status_code == 201

    def batch(n: int) -> bytes:
        return json.dumps({"events": [{"data": "d" * 1000}] * n}).encode()

    small, large = batch(150), batch(250)
    assert len(small) < 200_000 < len(large)
    json_headers = {**admin, "content-type": "application/json"}
    url = "/channels/news/events/batch"
    r = api.http.post(url, content=small, headers=json_headers)
    assert r.status_code == 201, r.text
    r = api.http.post(url, content=large, headers=json_headers)
    assert_json_refusal(r.status_code, dict(r.headers), r.content, 413)
    # Undeclared: the publish reads it on the hot path, and is cut there.
    r = api.http.post(url, content=iter([large]), headers=json_headers)
    assert_json_refusal(r.status_code, dict(r.headers), r.content, 413)
    assert (
        len(api.http.get("/channels/news/events?limit=1000", headers=admin).json()["events"]) == 150
    )


# Heads


@pytest.mark.parametrize(
    "headers",
    [["X-Huge: " + "h" * (17 * KIB)], [f"X-Pad-{i}: {'p' * 20}" for i in range(800)]],
    ids=["one-huge-header", "many-small-headers"],
)
def test_oversized_head_is_431(server: Server, headers: list[str]) -> None:
    with connect(server) as sock:
        sock.sendall(head("/healthz", *headers))
        status, response_headers, body = read_response(sock)
        assert_json_refusal(status, response_headers, body, 431)
    with connect(server) as sock:  # just under the limit: served
        sock.sendall(head("/healthz", "X-Big: " + "h" * (15 * KIB)))
        assert read_response(sock)[0] == 200


def test_header_that_never_ends_is_431_before_the_end(server: Server) -> None:
    with connect(server) as sock:
        first = b"GET /healthz HTTP/1.1\r\nHost: ssehub.test\r\nX-Endless: "
        sent, answer = stream_until_answered(sock, first, iter([b"e" * (16 * KIB)] * 640))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert sent < 5 * MIB


def test_unparsable_request_gets_uvicorns_plain_text_400_and_a_close(server: Server) -> None:
    """The one refusal that is not JSON: the parser fails before any app runs, and
    uvicorn answers in plain text (what the README says of it)."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost ssehub.test\r\n\r\n")
        status, headers, body = read_response(sock)
        assert (status, body) == (400, b"Invalid HTTP request received."), (status, body)
        assert headers["content-type"].startswith("text/plain")
        assert closed_by_peer(sock, 5)


# Slow clients


def drip(sock: socket.socket, data: bytes, started: list[float], closed_at: list[float]) -> None:
    """Send ``data`` one byte a second until the server closes ``sock`` (20 s at most)."""
    started.append(time.monotonic())
    for byte in data[:20]:
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        if closed_by_peer(sock, timeout=1):
            break
    closed_at.append(time.monotonic())


def test_slowloris_and_idle_connections_are_closed_after_10s(server: Server) -> None:
    """A head dripped one byte a second, on a new and on a kept-alive connection,
    and a connection that sends nothing: each closed at about 10 s, while
    others are served."""
    endless = head("/healthz", "X-Slow: " + "s" * 100)  # never completed at a byte a second
    new, kept, idle = connect(server, 20), connect(server, 20), connect(server, 20)
    kept.sendall(head("/healthz"))
    assert read_response(kept)[0] == 200
    timings: dict[str, tuple[list[float], list[float]]] = {}
    threads = []
    for name, sock in (("new", new), ("kept-alive", kept)):
        timings[name] = ([], [])
        drip_args = (sock, endless, *timings[name])
        threads.append(threading.Thread(target=drip, args=drip_args, daemon=True))
    idle_opened = time.monotonic()
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=server.url) as client:
        for _ in range(8):  # served meanwhile
            assert client.get("/healthz", timeout=2).status_code == 200
            time.sleep(1)
    assert closed_by_peer(idle, timeout=13 - (time.monotonic() - idle_opened))
    idle_lasted = time.monotonic() - idle_opened
    for thread in threads:
        thread.join(15)
    for sock in (new, kept, idle):
        sock.close()
    assert 9 <= idle_lasted <= 13, idle_lasted
    for name, (started, closed_at) in timings.items():
        lasted = closed_at[0] - started[0]
        assert 9 <= lasted <= 13, (name, lasted)


def ask_healthz(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(head("/healthz"))
    return read_response(sock)


def release_one_and_connect_again(server: Server, held: list[socket.socket]) -> None:
    """Close one of the ``held`` connections: a new one is served in its place,
    once the server has seen the close (its event loop may be busy a moment)."""
    held.pop().close()

    def served() -> bool:
        with connect(server) as again:
            return ask_healthz(again)[0] == 200

    wait_until(served, "a connection served in place of the one closed", timeout=5)


def test_connection_flood_past_max_connections_is_503(start_server: Callable[..., Server]) -> None:
    srv = start_server(SSEHUB_MAX_CONNECTIONS="5")
    held = [connect(srv) for _ in range(5)]
    try:
        for sock in held:  # five connections are served...
            assert ask_healthz(sock)[0] == 200
        with connect(srv) as extra:  # ...a sixth is refused at once
            started = time.monotonic()
            status, headers, body = ask_healthz(extra)
            assert time.monotonic() - started < 1
            assert_json_refusal(status, headers, body, 503)
        release_one_and_connect_again(srv, held)
    finally:
        for sock in held:
            sock.close()


# Client address


def access_log_client(server: Server, forwarded_for: str) -> str:
    """The client address in the access log line of one request sent with
    ``X-Forwarded-For`` from 127.0.0.1."""
    probe = uuid.uuid4().hex
    r = httpx.get(f"{server.url}/healthz?probe={probe}", headers={"X-Forwarded-For": forwarded_for})
    assert r.status_code == 200
    for _ in range(50):
        lines = [line for line in server.log().splitlines() if probe in line]
        if lines:
            return lines[0].split(" - ")[0].split()[-1]
        time.sleep(0.05)
    raise AssertionError("no access log line")


def test_forged_forwarded_for_is_ignored_unless_the_proxy_is_trusted(
    server: Server, start_server: Callable[..., Server]
) -> None:
    assert access_log_client(server, "203.0.113.7").startswith("127.0.0.1:")
    proxied = start_server(SSEHUB_TRUSTED_PROXIES="127.0.0.1/32")
    assert access_log_client(proxied, "203.0.113.7").startswith("203.0.113.7")


# Bodies that never come, responses nobody reads

# Deadlines lowered for the suite (the defaults are 10, 60 and 30 s).
BODY_IDLE, BODY_TOTAL, SEND_TIMEOUT = 2.0, 5.0, 3.0
SLACK = 2.0  # a sweep's period, plus a loaded machine


def slow_server(start_server: Callable[..., Server], **env: str) -> Server:
    return start_server(
        SSEHUB_BODY_IDLE_SECONDS=str(BODY_IDLE),
        SSEHUB_BODY_TOTAL_SECONDS=str(BODY_TOTAL),
        SSEHUB_SEND_TIMEOUT_SECONDS=str(SEND_TIMEOUT),
        **env,
    )


REGISTER = head(
    "/auth/register", "Content-Type: application/json", "Content-Length: 100", method="POST"
)


def test_eight_sockets_holding_their_bodies_get_408_and_healthz_answers_again(
    start_server: Callable[..., Server],
) -> None:
    """The full house: every connection a complete head and a body that never
    comes. /healthz is refused while they hold, answered once the body deadline
    has sent each of them a 408 and closed it."""
    srv = slow_server(start_server, SSEHUB_MAX_CONNECTIONS="8")
    held = [connect(srv) for _ in range(8)]
    try:
        started = time.monotonic()
        for sock in held:
            sock.sendall(REGISTER)
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 503  # the attack holds
        for sock in held:
            status, headers, body = read_response(sock)
            assert_json_refusal(status, headers, body, 408)
            assert closed_by_peer(sock, timeout=SLACK)
        lasted = time.monotonic() - started
        assert BODY_IDLE - 0.5 <= lasted <= BODY_IDLE + SLACK, lasted
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
    finally:
        for sock in held:
            sock.close()
    assert "Traceback" not in srv.log()


def trickle(sock: socket.socket, request: bytes, body: bytes, every: float) -> tuple[int, float]:
    """Send a head, then ``body`` one byte each ``every`` seconds until the server
    answers; returns the answer's status and when it came (from the head)."""
    sock.sendall(request)
    started = time.monotonic()
    for byte in body:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            break
        sock.send(bytes([byte]))
    status = read_response(sock)[0]
    return status, time.monotonic() - started


def test_body_trickled_or_stalled_gets_408_while_an_honest_slow_body_is_served(
    start_server: Callable[..., Server],
) -> None:
    srv = slow_server(start_server)
    api = Api(srv.url)
    admin = api.admin()
    assert api.http.post("/channels", json={"name": "news"}, headers=admin).status_code == 201
    body = json.dumps({"username": "slowpoke", "password": "password-123"}).encode()
    request = head(
        "/auth/register",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        method="POST",
    )
    publish = head(
        "/channels/news/events",
        f"Authorization: {admin['Authorization']}",
        "Content-Type: application/json",
        "Content-Length: 100",
        method="POST",
    )
    plays = {
        # A byte within every idle period, but never done: the total deadline.
        "trickled": (body, BODY_IDLE / 2),
        # Slower than a byte per idle period: the idle deadline.
        "stalled": (body, BODY_IDLE + 1.5),
        # Three pieces a second apart: complete well within both.
        "honest": (body, 0.0),
        # A publish (the hot path) whose body never comes.
        "publish": (b"", 0.0),
    }
    results: dict[str, tuple[int, float]] = {}

    def play(name: str) -> None:
        data, every = plays[name]
        with connect(srv, timeout=BODY_TOTAL + 10) as sock:
            started = time.monotonic()
            try:
                if name == "honest":
                    sock.sendall(request)
                    for piece in (data[:10], data[10:20], data[20:]):
                        time.sleep(min(1.0, BODY_IDLE / 2))
                        sock.sendall(piece)
                    results[name] = (read_response(sock)[0], time.monotonic() - started)
                elif name == "publish":
                    sock.sendall(publish)
                    results[name] = (read_response(sock)[0], time.monotonic() - started)
                else:
                    results[name] = trickle(sock, request, data, every)
            except OSError:  # no answer at all
                results[name] = (0, time.monotonic() - started)

    threads = [threading.Thread(target=play, args=(name,)) for name in plays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BODY_TOTAL + 15)
    assert results["honest"][0] == 201, results
    status, lasted = results["trickled"]
    assert status == 408 and BODY_TOTAL - 0.5 <= lasted <= BODY_TOTAL + SLACK, results
    for name in ("stalled", "publish"):
        status, lasted = results[name]
        assert status == 408 and BODY_IDLE - 0.5 <= lasted <= BODY_IDLE + SLACK, results
    assert "Traceback" not in srv.log()


TCP_ESTABLISHED = 1


def tcp_state(sock: socket.socket) -> int:
    """The kernel's state of ``sock`` (``tcpi_state``), read without reading any data:
    a peer's reset moves it out of ESTABLISHED while unread bytes wait."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def unread_connection(server: Server, request: bytes) -> socket.socket:
    """A connection that sends ``request`` and then reads nothing (a small
    receive buffer, so the server's writes back up quickly)."""
    parts = urlsplit(server.url)
    assert parts.hostname and parts.port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    sock.sendall(request)
    return sock


def dropped_within(sock: socket.socket, timeout: float, server: Server) -> float | None:
    """Seconds until the server drops ``sock`` (None: not within ``timeout``);
    /healthz is asked meanwhile and must answer each time."""
    started = time.monotonic()
    with httpx.Client(base_url=server.url) as client:
        while time.monotonic() - started < timeout:
            if tcp_state(sock) != TCP_ESTABLISHED:
                return time.monotonic() - started
            assert client.get("/healthz", timeout=2).status_code == 200
            time.sleep(0.1)
    return None


def test_big_history_page_never_read_is_dropped_after_the_send_timeout(
    start_server: Callable[..., Server],
) -> None:
    srv = slow_server(start_server, SSEHUB_MAX_EVENT_BYTES=str(8 * MIB))
    api = Api(srv.url)
    admin = api.admin()
    assert api.http.post("/channels", json={"name": "big"}, headers=admin).status_code == 201
    r = api.http.post("/channels/big/events", json={"data": "x" * (6 * MIB)}, headers=admin)
    assert r.status_code == 201, r.text[:200]
    get = head("/channels/big/events?limit=10", f"Authorization: {admin['Authorization']}")
    with unread_connection(srv, get) as sock:
        lasted = dropped_within(sock, SEND_TIMEOUT + 10, srv)
    assert lasted is not None, "a response nobody reads holds its connection"
    assert lasted >= SEND_TIMEOUT - 0.5, lasted
    # The server goes on serving the same page to a reader.
    r = api.http.get("/channels/big/events?limit=10", headers=admin)
    assert r.status_code == 200 and len(r.json()["events"]) == 1


def test_stream_nobody_reads_is_let_go_as_a_slow_reader_and_its_socket_freed(
    start_server: Callable[..., Server],
) -> None:
    """A stream keeps its own rule for a reader that takes nothing: the hub lets
    it go once one write has waited the send timeout, and counts it (a heartbeat
    starts such a write at the latest). The connection is then freed too, not
    left waiting to flush to a reader that never reads. A stream that reads
    stays open past the send timeout."""
    srv = slow_server(start_server, SSEHUB_HEARTBEAT_SECONDS="1")
    api = Api(srv.url)
    admin = api.admin()
    assert api.http.post("/channels", json={"name": "feed"}, headers=admin).status_code == 201
    token = api.http.post("/auth/stream-token", headers=admin).json()["stream_token"]
    stream = head(f"/channels/feed/stream?access_token={token}")
    reader = connect(srv)
    reader.sendall(stream)
    with unread_connection(srv, stream) as sock:
        wait_until(lambda: metric(srv.url, "ssehub_streams_open") == 2, "both streams registered")
        batch = {"events": [{"data": "y" * 60_000} for _ in range(100)]}  # 6 MB
        r = api.http.post("/channels/feed/events/batch", json=batch, headers=admin)
        assert r.status_code == 201, r.text[:200]
        got = 0
        deadline = time.monotonic() + 20
        while got < 6_000_000 and time.monotonic() < deadline:
            got += len(reader.recv(1 << 20))
        assert got >= 6_000_000
        lasted = dropped_within(sock, 1 + SEND_TIMEOUT + 10, srv)
    assert lasted is not None, "a stream nobody reads holds its connection"
    assert metric(srv.url, "ssehub_slow_reader_disconnects_total") == 1
    time.sleep(SEND_TIMEOUT)
    assert api.http.post("/channels/feed/events", json={"data": "on"}, headers=admin).is_success
    reader.settimeout(5)
    seen = b""
    while b'"data":"on"' not in seen:  # the reading stream is still open
        chunk = reader.recv(1 << 20)
        assert chunk, "the reading stream was closed"
        seen = seen[-100:] + chunk
    reader.close()


def connect_from(server: Server, address: str) -> socket.socket:
    parts = urlsplit(server.url)
    assert parts.hostname and parts.port
    return socket.create_connection((parts.hostname, parts.port), 10, (address, 0))


def test_one_address_cannot_take_every_connection(start_server: Callable[..., Server]) -> None:
    """Past SSEHUB_MAX_CONNECTIONS_PER_CLIENT, one address's next connection is
    refused at once; another address is served, and so is a trusted proxy,
    whose connections carry many clients."""
    for proxies, refused in (("", True), ("127.0.0.1/32", False)):
        srv = start_server(SSEHUB_MAX_CONNECTIONS_PER_CLIENT="3", SSEHUB_TRUSTED_PROXIES=proxies)
        held = [connect(srv) for _ in range(3)]
        try:
            for sock in held:
                assert ask_healthz(sock)[0] == 200
            with connect(srv) as extra:
                status, headers, body = ask_healthz(extra)
                if refused:
                    assert_json_refusal(status, headers, body, 429)
                    assert headers["retry-after"]
                else:
                    assert status == 200, body
            with connect_from(srv, "127.0.0.2") as other:
                assert ask_healthz(other)[0] == 200
            release_one_and_connect_again(srv, held)
        finally:
            for sock in held:
                sock.close()


# Shared replay pages


def resume_until_live(server: Server, path: str, position: int) -> int:
    """Open a stream at ``position``, read its replay up to ``ssehub.live``, close it;
    returns the bytes read."""
    with connect(server, timeout=30) as sock:
        sock.sendall(head(path, f"Last-Event-ID: {position}"))
        seen, total = b"", 0
        while b"event: ssehub.live" not in seen:
            chunk = sock.recv(1 << 20)
            assert chunk, "the stream ended before its replay did"
            total += len(chunk)
            seen = seen[-100:] + chunk
        return total


def test_150_resumes_from_distinct_positions_do_not_grow_the_process(
    start_server: Callable[..., Server],
) -> None:
    """The shared replay pages are bounded in bytes and expire: resumes from
    ever new positions (each a page nobody else asks for) cannot make the
    process keep a page per position."""
    srv = start_server(SSEHUB_MAX_STREAMS_PER_USER="1000")
    api = Api(srv.url)
    admin = api.admin()
    assert api.http.post("/channels", json={"name": "log"}, headers=admin).status_code == 201
    ids: list[int] = []
    for _ in range(2):  # 1,200 events of 1 kB: a 1.2 MB channel
        batch = {"events": [{"data": "z" * 1000} for _ in range(600)]}
        r = api.http.post("/channels/log/events/batch", json=batch, headers=admin)
        assert r.status_code == 201, r.text[:200]
        ids += [e["id"] for e in r.json()["events"]]
    token = api.http.post("/auth/stream-token", headers=admin).json()["stream_token"]
    path = f"/channels/log/stream?access_token={token}"
    positions = ids[:-1:7][:151]  # distinct, from the whole channel to its last ~150 kB
    assert len(positions) == 151
    resume_until_live(srv, path, positions.pop())  # warmed up
    before = server_rss(srv)
    replayed = sum(resume_until_live(srv, path, position) for position in positions)
    grown = server_rss(srv) - before
    assert replayed > 80 * MIB  # the resumes did read their replays
    assert grown < 96 * MIB, f"the process grew by {grown / MIB:.0f} MiB"
