"""``ssehub`` itself as an operator runs it: ``ssehub serve`` on a free port, the CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent.parent
TEST_SECRET = "test-secret-key-that-is-long-enough-for-hs256-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# What every server a test starts is given, unless the test says otherwise.
SERVER_ENV = {
    "SSEHUB_SECRET_KEY": TEST_SECRET,
    "SSEHUB_DATA_DIR": str(ROOT / ".ssehub-test" / "data"),
    # The suite logs in wrongly from one address far more than an attacker is
    # allowed to; the limit itself is tested with its default.
    "SSEHUB_LOGIN_ATTEMPTS_PER_MINUTE": "1000000",
}


@dataclass
class Server:
    """``ssehub serve`` in a subprocess on a free port.

    ``database_url=None`` runs it without ``SSEHUB_DATABASE_URL``: on the
    embedded Postgres under ``SSEHUB_DATA_DIR`` (pass that in ``env``).
    """

    database_url: str | None
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # False: no --port, for a test that gives the port in SSEHUB_PORT instead.
    port_flag: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Server:
        """Launch, then wait until ``/readyz`` answers 200."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> Server:
        """Start the process and return at once, ready or not."""
        env = {**os.environ, **SERVER_ENV, **self.env}
        if self.database_url is None:
            env.pop("SSEHUB_DATABASE_URL", None)
            env.pop("SSEHUB_SECRET_KEY", None)
        else:
            env["SSEHUB_DATABASE_URL"] = self.database_url
        self.log_path = ROOT / ".ssehub-test" / f"server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "app.cli", "serve", "--workers", str(self.workers)]
        cmd += ["--port", str(self.port)] if self.port_flag else []
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
        return self

    def wait_ready(self, timeout: float = 30) -> Server:
        """Wait until ``/readyz`` answers 200; stop the process if it never does."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 10) -> float:
        """SIGTERM, wait for exit; returns how long the exit took."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - started


def run_cli(*args: str, database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``ssehub ARGS`` in a subprocess against ``database_url``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={
            **os.environ,
            "SSEHUB_SECRET_KEY": TEST_SECRET,
            "SSEHUB_DATABASE_URL": database_url,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
