"""The admin from the environment: ``serve`` creates it once, however many
instances start, and never changes an existing user. Real servers, started as
an operator starts them."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf

from tests.support import Api, auth, sql


def _me(api: Api, username: str, password: str) -> dict[str, object]:
    me: dict[str, object] = api.http.get(
        "/users/me", headers=auth(api.login(username, password))
    ).json()
    return me


def _login_status(api: Api, username: str, password: str) -> int:
    r = api.http.post("/auth/token", data={"username": username, "password": password})
    return r.status_code


def test_admin_bootstrap_from_environment(start_server, database_url: str) -> None:
    """``serve`` creates the admin if missing; a user of that name is left exactly as is."""
    base = Api(start_server().url)
    base.register("boss")
    srv = start_server(SSEHUB_ADMIN_USERNAME="boss", SSEHUB_ADMIN_PASSWORD="boss-password")
    api = Api(srv.url)
    assert _me(api, "boss", "password-123")["is_admin"] is False
    assert _login_status(api, "boss", "boss-password") == 401
    assert "admin boss exists" in srv.log()
    srv2 = start_server(SSEHUB_ADMIN_USERNAME="chief", SSEHUB_ADMIN_PASSWORD="chief-password")
    assert _me(Api(srv2.url), "chief", "chief-password")["is_admin"] is True


def test_a_restart_with_another_admin_password_keeps_the_first(start_server) -> None:
    """The bootstrap password is for the first start: a restart must not reset a password
    the admin has since relied on (nor let whoever edits the environment take the account)."""
    first = start_server(SSEHUB_ADMIN_USERNAME="chief", SSEHUB_ADMIN_PASSWORD="first-password")
    first.stop()
    again = start_server(SSEHUB_ADMIN_USERNAME="chief", SSEHUB_ADMIN_PASSWORD="other-password")
    api = Api(again.url)
    assert _me(api, "chief", "first-password")["is_admin"] is True
    assert _login_status(api, "chief", "other-password") == 401
    lines = [line for line in again.log().splitlines() if "admin chief exists" in line]
    assert len(lines) == 1 and lines[0].startswith("INFO"), again.log()


def test_instances_starting_together_bootstrap_one_admin(start_server, database_url: str) -> None:
    """Behind a load balancer several instances start at once with the same admin settings."""
    env = {"SSEHUB_ADMIN_USERNAME": "chief", "SSEHUB_ADMIN_PASSWORD": "chief-password"}
    with cf.ThreadPoolExecutor(3) as pool:
        servers = list(pool.map(lambda _: start_server(**env), range(3)))
    for srv in servers:
        api = Api(srv.url)
        me = api.http.get("/users/me", headers=auth(api.login("chief", "chief-password"))).json()
        assert me["is_admin"] is True
    rows = asyncio.run(sql(database_url, "SELECT count(*) FROM users WHERE username = 'chief'"))
    assert rows[0][0] == 1
