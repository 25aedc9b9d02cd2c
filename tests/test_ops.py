"""Operations endpoints, error format, API docs, and tokens kept out of logs."""

from __future__ import annotations

from tests.support import ROOT, Api, Server, wait_until


def test_health_and_readiness(api: Api) -> None:
    assert api.http.get("/healthz").json() == {"status": "ok"}
    r = api.http.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_docs_and_bearer_scheme(api: Api) -> None:
    docs = api.http.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "swagger" in docs.text.lower()
    schemes = api.http.get("/openapi.json").json()["components"]["securitySchemes"]
    scheme = schemes["OAuth2PasswordBearer"]
    assert scheme["type"] == "oauth2"
    assert scheme["flows"]["password"]["tokenUrl"] == "/auth/token"
    # API keys, and the stream credentials a browser can send, are documented too.
    assert schemes["APIKey"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "ssehub_…",
        "description": "An API key (POST /api-keys): publishing and history only.",
    }
    assert schemes["StreamCookie"]["in"] == "cookie"
    assert schemes["StreamCookie"]["name"] == "ssehub_stream"
    assert schemes["StreamTokenQuery"]["in"] == "query"


def test_errors_are_json_detail(api: Api) -> None:
    r = api.http.get("/no/such/route")
    assert r.status_code == 404 and "detail" in r.json()
    r = api.http.delete("/healthz")
    assert r.status_code == 405 and "detail" in r.json()
    r = api.http.put("/auth/register")
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}


def test_tokens_never_reach_the_log(api: Api, server: Server) -> None:
    token = api.login("admin", "admin-password-1")
    assert api.http.get(f"/users/me?access_token={token}").status_code == 401  # REST: header only
    api.http.get(f"/stream?access_token={token}", timeout=2, headers={"Last-Event-ID": "x"})
    api.http.get("/users/me", headers={"Authorization": f"Bearer {token}x"})  # failing auth
    # The server decodes parameter names, so an encoded name must be redacted too.
    api.http.get(f"/users/me?x=1&access%5Ftoken={token}&%61ccess_token={token}")
    wait_until(lambda: "GET /users/me?x=1&" in server.log(), "the last request's log line")
    log = server.log()
    # The access log is on (the line is there), with the value replaced.
    assert "GET /users/me?access_token=[redacted] HTTP/1.1" in log
    assert "access_token=[redacted]" in log
    assert token not in log
    assert token.split(".")[2] not in log


NASTY_REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("POST", "/auth/register", {"content-type": "text/plain"}, b'{"username":"a"}'),
    ("POST", "/auth/register", {}, b""),
    ("POST", "/auth/register", {"content-type": "application/json"}, b"null"),
    ("POST", "/auth/register", {"content-type": "application/json"}, b"[" * 100_000),
    ("POST", "/auth/register", {"content-type": "application/json"}, b'"\xc3\x28"'),
    ("POST", "/auth/register", {"content-type": "application/json"}, b"x" * 3_000_000),
    ("POST", "/auth/token", {"content-type": "application/x-www-form-urlencoded"}, b"\xff=\xfe"),
    ("POST", "/auth/token", {"content-type": "multipart/form-data"}, b"no boundary"),
    ("POST", "/auth/token", {"content-type": "multipart/form-data; boundary=x"}, b"--x\r\njunk"),
    ("POST", "/auth/token", {"content-type": "application/json"}, b'{"username":"a"}'),
    ("POST", "/auth/stream-token", {"authorization": "Bearer " + "a" * 50_000}, b""),
    ("GET", "/users/me", {"authorization": "Basic YTpi"}, b""),
    ("GET", "/users/me", {"authorization": "Bearer"}, b""),
]


def test_nothing_a_client_sends_is_a_500(api: Api) -> None:
    for method, path, headers, body in NASTY_REQUESTS:
        r = api.http.request(method, path, headers=headers, content=body)
        assert 400 <= r.status_code < 500, (path, headers, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json", (path, r.headers)
        assert r.json()["detail"], (path, r.text)
        if r.status_code == 401:
            assert r.headers["www-authenticate"] == "Bearer"


def test_cors_covers_every_endpoint_the_hot_paths_included(start_server) -> None:  # type: ignore[no-untyped-def]
    """Publishing and streams are served in front of FastAPI: CORS must cover them too."""
    srv = start_server(SSEHUB_CORS_ORIGINS="https://app.example")
    api = Api(srv.url)
    admin = api.admin()
    assert api.http.post("/channels", json={"name": "news"}, headers=admin).status_code == 201
    origin = {"Origin": "https://app.example"}
    preflight = api.http.options(
        "/channels/news/events",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    r = api.http.post("/channels/news/events", json={"data": 1}, headers={**admin, **origin})
    assert r.status_code == 201
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    token = api.http.post("/auth/stream-token", headers=admin).json()["stream_token"]
    with api.http.stream(
        "GET", f"/channels/news/stream?access_token={token}", headers=origin
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == "https://app.example"
    r = api.http.get("/channels/news", headers={**admin, **origin})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    foreign = api.http.post(
        "/channels/news/events",
        json={"data": 2},
        headers={**admin, "Origin": "https://evil.example"},
    )
    assert "access-control-allow-origin" not in foreign.headers


def test_the_browser_client_is_served_as_a_module_a_browser_revalidates(api: Api) -> None:
    """``/ssehub-client.js`` is the committed build of ``clients/js`` (``clients/js/ci.sh``
    checks it against a fresh build), kept but revalidated (``no-cache`` + ETag)."""
    r = api.http.get("/ssehub-client.js")
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] in {"text/javascript", "application/javascript"}
    assert r.headers["cache-control"] == "no-cache"
    assert r.content == (ROOT / "app" / "static" / "ssehub-client.js").read_bytes()
    assert "export {" in r.text and "SsehubClient" in r.text
    again = api.http.get("/ssehub-client.js", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    assert api.http.get("/").headers["cache-control"] == "no-cache"
    assert api.http.get("/ssehub.js").status_code == 404  # one browser client
