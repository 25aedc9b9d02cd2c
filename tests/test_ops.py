"""Operations endpoints, error format, API docs, and tokens kept out of logs."""

from __future__ import annotations

import time

from tests.support import Api, Server


def test_health_and_readiness(api: Api) -> None:
    assert api.http.get("/healthz").json() == {"status": "ok"}
    r = api.http.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_docs_and_bearer_scheme(api: Api) -> None:
    assert api.http.get("/docs").status_code == 200
    schemes = api.http.get("/openapi.json").json()["components"]["securitySchemes"]
    (scheme,) = schemes.values()
    assert scheme["type"] == "oauth2"
    assert scheme["flows"]["password"]["tokenUrl"] == "/auth/token"


def test_errors_are_json_detail(api: Api) -> None:
    r = api.http.get("/no/such/route")
    assert r.status_code == 404 and "detail" in r.json()
    r = api.http.delete("/healthz")
    assert r.status_code == 405 and "detail" in r.json()


def test_tokens_never_reach_the_log(api: Api, server: Server) -> None:
    token = api.login("admin", "admin-password-1")
    assert api.http.get(f"/users/me?access_token={token}").status_code == 401  # REST: header only
    api.http.get(f"/stream?access_token={token}", timeout=2, headers={"Last-Event-ID": "x"})
    time.sleep(0.3)
    log = server.log()
    assert "access_token=[redacted]" in log
    assert token not in log
    assert token.split(".")[2] not in log
