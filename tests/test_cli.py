"""The command line: create-admin, migrate, and serve on the embedded Postgres."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from app.config import KeyFileError, Settings, ensure_secret_key
from tests.support import ROOT, TEST_SECRET, Api, Server, free_port, sql, wait_until


def _cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={**os.environ, "SSEHUB_SECRET_KEY": TEST_SECRET, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_create_admin_creates_then_promotes(api: Api, database_url: str) -> None:
    done = _cli(
        "create-admin",
        "root-user",
        SSEHUB_DATABASE_URL=database_url,
        SSEHUB_ADMIN_PASSWORD="root-password",
    )
    assert done.returncode == 0, done.stderr
    assert "created" in done.stdout
    token = api.login("root-user", "root-password")
    assert api.http.get("/users/me", headers={"Authorization": f"Bearer {token}"}).json()[
        "is_admin"
    ]
    api.register("plain")
    done = _cli(
        "create-admin",
        "plain",
        SSEHUB_DATABASE_URL=database_url,
        SSEHUB_ADMIN_PASSWORD="new-password",
    )
    assert done.returncode == 0 and "promoted" in done.stdout
    rows = asyncio.run(sql(database_url, "SELECT is_admin FROM users WHERE username = 'plain'"))
    assert rows[0][0] is True
    # Unlike serve's bootstrap, create-admin is the deliberate reset of the password.
    assert api.login("plain", "new-password")
    r = api.http.post("/auth/token", data={"username": "plain", "password": "password-123"})
    assert r.status_code == 401


def test_create_admin_refuses_a_weak_password(database_url: str) -> None:
    done = _cli(
        "create-admin", "weak", SSEHUB_DATABASE_URL=database_url, SSEHUB_ADMIN_PASSWORD="short"
    )
    assert done.returncode != 0
    rows = asyncio.run(sql(database_url, "SELECT 1 FROM users WHERE username = 'weak'"))
    assert rows == []


def _serve_refused(**env: str) -> subprocess.CompletedProcess[str]:
    """``ssehub serve`` with ``env``, expected to refuse to start (60 s if it serves)."""
    return _cli("serve", "--port", str(free_port()), timeout=60, **env)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (it removes its pid file just before)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_serve_on_the_embedded_postgres_reuses_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {"SSEHUB_DATA_DIR": str(data_dir)}
    first = Server(None, env=env).start(timeout=90)
    try:
        api = Api(first.url)
        api.register("keeper")
        token = api.login("keeper")
        pid_line = (data_dir / "pg" / "postmaster.pid").read_text().split("\n", 1)[0]
        postmaster = int(pid_line)
    finally:
        assert first.stop() < 10
    assert "generated a development key" in first.log()
    key_file = data_dir / "secret_key"
    assert key_file.stat().st_mode & 0o077 == 0, "the generated key is readable by others"
    key = key_file.read_text()
    assert len(key) >= 32
    assert not (data_dir / "pg" / "postmaster.pid").exists()
    wait_until(lambda: _gone(postmaster), "the embedded Postgres to exit with serve", 5)
    second = Server(None, env=env).start(timeout=90)
    try:
        # Same data, same generated key: the old token still works.
        r = httpx.get(f"{second.url}/users/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["username"] == "keeper"
        assert key_file.read_text() == key
        assert "generated a development key" not in second.log()
    finally:
        second.stop()


WEAK_KEYS = ["too-short", "x" * 64, "change-me-to-a-long-random-string-42"]


@pytest.mark.parametrize("key", WEAK_KEYS)
def test_weak_secret_keys_are_refused(database_url: str, key: str) -> None:
    done = _cli("migrate", SSEHUB_DATABASE_URL=database_url, SSEHUB_SECRET_KEY=key)
    assert done.returncode != 0
    assert "SSEHUB_SECRET_KEY" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("key", ["", "  \n\t ", *WEAK_KEYS])
def test_an_empty_or_weak_key_file_is_refused(tmp_path: Path, database_url: str, key: str) -> None:
    """The key file is held to the rule of SSEHUB_SECRET_KEY, and never replaced or used.

    ``migrate`` reads the key exactly as ``serve`` does, and returns where a
    ``serve`` that wrongly accepted the key would go on serving."""
    key_file = tmp_path / "secret_key"
    key_file.write_text(key)
    env = {k: v for k, v in os.environ.items() if k != "SSEHUB_SECRET_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        cwd=ROOT,
        env={**env, "SSEHUB_DATABASE_URL": database_url, "SSEHUB_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert str(key_file) in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert key_file.read_text() == key


@pytest.mark.parametrize("key", WEAK_KEYS)
def test_one_rule_for_the_key_from_the_environment_and_from_the_file(
    tmp_path: Path, key: str
) -> None:
    with pytest.raises(ValidationError):
        Settings(secret_key=key)
    (tmp_path / "secret_key").write_text(key)
    with pytest.raises(KeyFileError, match="secret_key"):
        ensure_secret_key(Settings(secret_key=None, data_dir=tmp_path))
    good = "a-random-looking-key-0123456789-abcdefghijklmnop"
    (tmp_path / "secret_key").write_text(f"{good}\n")
    assert ensure_secret_key(Settings(secret_key=None, data_dir=tmp_path)).secret_key == good


def test_settings_come_from_a_dotenv_file(tmp_path: Path, database_url: str) -> None:
    """``.env`` in the working directory is read: its weak key is refused."""
    (tmp_path / ".env").write_text("SSEHUB_SECRET_KEY=short\n")
    env = {k: v for k, v in os.environ.items() if k != "SSEHUB_SECRET_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        cwd=tmp_path,
        env={**env, "SSEHUB_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "SSEHUB_SECRET_KEY" in done.stderr


def _documented(text: str) -> set[str]:
    return set(re.findall(r"\bSSEHUB_[A-Z_]+[A-Z]\b", text))


def test_every_setting_is_documented() -> None:
    """``.env.example`` and the README's table list exactly the settings there are."""
    settings = {f"SSEHUB_{name.upper()}" for name in Settings.model_fields}
    example = _documented((ROOT / ".env.example").read_text())
    assert example == settings
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert _documented(table) == settings


def test_processes_starting_together_share_one_generated_key(tmp_path: Path) -> None:
    code = (
        "import time; from app.config import Settings, ensure_secret_key; "
        f"time.sleep(max(0, {time.time() + 1.5} - time.time())); "  # all start at one instant
        "print(ensure_secret_key(Settings()).secret_key)"
    )
    env = {k: v for k, v in os.environ.items() if k != "SSEHUB_SECRET_KEY"}
    env["SSEHUB_DATA_DIR"] = str(tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    keys = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert len(keys) == 1 and (tmp_path / "secret_key").read_text() in keys
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]  # no temporary files left


def test_an_unreachable_database_is_one_clear_line(database_url: str) -> None:
    for url in (
        "postgresql+asyncpg://postgres@127.0.0.1:1/ssehub",  # nothing listens there
        database_url.rsplit("/", 1)[0] + "/no_such_database",
    ):
        done = _cli("migrate", SSEHUB_DATABASE_URL=url)
        assert done.returncode != 0
        assert "cannot use the database" in done.stderr and "Traceback" not in done.stderr


def test_a_killed_server_does_not_leave_the_embedded_postgres_running(tmp_path: Path) -> None:
    """After a SIGKILL, the next run reuses the orphaned Postgres and, on exit, stops it."""
    env = {"SSEHUB_DATA_DIR": str(tmp_path / "data")}
    first = Server(None, env=env).start(timeout=90)
    Api(first.url).register("keeper")
    pid_file = tmp_path / "data" / "pg" / "postmaster.pid"
    postmaster = int(pid_file.read_text().split("\n", 1)[0])
    assert first.process is not None
    first.process.kill()  # no clean-up at all
    first.process.wait()
    second = Server(None, env=env).start(timeout=90)
    try:
        assert Api(second.url).login("keeper")
    finally:
        second.stop()
    assert not pid_file.exists()
    wait_until(lambda: _gone(postmaster), "the embedded Postgres to exit after a crash", 5)


@pytest.mark.parametrize(
    ("username", "password"), [("bad name", "boss-password"), ("boss", "short")]
)
def test_serve_refuses_an_admin_that_could_not_register(
    database_url: str, username: str, password: str
) -> None:
    """A bootstrap admin outside the registration rules could never log in: refuse to start."""
    done = _serve_refused(
        SSEHUB_DATABASE_URL=database_url,
        SSEHUB_ADMIN_USERNAME=username,
        SSEHUB_ADMIN_PASSWORD=password,
    )
    assert done.returncode != 0 and "invalid admin account" in done.stderr, done.stderr
    rows = asyncio.run(sql(database_url, "SELECT 1 FROM users WHERE username = $1", username))
    assert rows == []


def test_database_urls_in_other_spellings(database_url: str) -> None:
    """``postgres://`` and ``postgresql://`` mean asyncpg; another scheme is one clear line."""
    rest = database_url.split("://", 1)[1]
    for scheme in ("postgresql", "postgres"):
        done = _cli("migrate", SSEHUB_DATABASE_URL=f"{scheme}://{rest}")
        assert done.returncode == 0, done.stderr
    for url in (f"mysql://{rest}", f"postgresql+psycopg://{rest}", "not a url"):
        done = _cli("migrate", SSEHUB_DATABASE_URL=url)
        assert done.returncode != 0
        assert "SSEHUB_DATABASE_URL" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("origins", ["*", "https://app.example, *"])
def test_cors_origins_star_is_refused_at_start(database_url: str, origins: str) -> None:
    """Streams allow credentials for the configured origins: ``*`` would let every
    site read a user's streams with their cookie."""
    done = _serve_refused(SSEHUB_DATABASE_URL=database_url, SSEHUB_CORS_ORIGINS=origins)
    assert done.returncode != 0, done.stderr[-2000:]
    assert "SSEHUB_CORS_ORIGINS" in done.stderr and "*" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
