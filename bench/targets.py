"""The servers under test: ssehub, Nchan (its peer) and the FastAPI tutorial.

Each is started fresh for a scenario and stopped after it, pinned to CPU 0
(``taskset -c 0``) with one process or worker, so every figure is one core's;
the load generator runs on CPU 1. A target knows its own URLs, bodies and
event ids, so the scenarios (``bench.scenarios``) run the same steps against
each.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import httpx

from bench import cost
from bench.loadgen import HttpClient

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PG = os.environ.get("SSEHUB_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
SECRET = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex
ADMIN = ("bench", "bench-password-1")
NGINX = os.environ.get("SSEHUB_BENCH_NGINX", shutil.which("nginx") or "/usr/sbin/nginx")
NCHAN_MODULE = os.environ.get(
    "SSEHUB_BENCH_NCHAN_MODULE", "/usr/lib/nginx/modules/ngx_nchan_module.so"
)
NCHAN_CONF = Path(__file__).resolve().parent / "nchan" / "nginx.conf.template"
BATCH = 1000  # events per publish when a target takes batches


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass
class Target:
    """One running server."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    headers: dict[str, str] = field(default_factory=dict)  # sent with every publish
    has_history: ClassVar[bool] = False  # does it replay what a Last-Event-ID missed?
    takes_batches: ClassVar[bool] = False

    def pids(self) -> list[int]:
        return cost.descendants(self.process.pid)

    def rss_kib(self) -> int:
        return cost.rss_kib(self.pids())

    def client(self) -> HttpClient:
        return HttpClient(HOST, self.port, self.headers)

    def publish_path(self, channel: str) -> str:
        return f"/publish/{channel}"

    def stream_path(self, channel: str) -> str:
        return f"/stream/{channel}"

    def publish_body(self, channel: str, data: dict[str, Any]) -> bytes:
        return compact({"type": "message", "data": data})

    def event_id(self, answer: bytes) -> str:
        """The id a client resumes after, from a publish's answer."""
        return str(json.loads(answer)["id"])

    async def create_channel(self, channel: str) -> None:
        """Channels exist on first use, except where they are resources (ssehub)."""

    async def publish(self, client: HttpClient, channel: str, data: dict[str, Any]) -> str:
        status, answer = await client.post(
            self.publish_path(channel), self.publish_body(channel, data)
        )
        if not 200 <= status < 300:
            raise RuntimeError(f"{self.name}: publish answered {status}: {answer[:200]!r}")
        return self.event_id(answer)

    async def publish_many(self, channel: str, data: list[dict[str, Any]]) -> None:
        """Publish every item, in order, one request each."""
        client = self.client()
        try:
            for item in data:
                await self.publish(client, channel, item)
        finally:
            client.close()

    def restart(self) -> bool:
        """Stop and start again on the same port and state; False where that would
        lose the history a resume needs (Nchan keeps it in memory)."""
        return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- ssehub ------------------------------------------------------------------------


@dataclass
class Ssehub(Target):
    database: str = ""
    stream_query: str = ""  # the stream token
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    owns_database: bool = True
    has_history: ClassVar[bool] = True
    takes_batches: ClassVar[bool] = True

    def publish_path(self, channel: str) -> str:
        return f"/channels/{channel}/events"

    def stream_path(self, channel: str) -> str:
        return f"/channels/{channel}/stream?{self.stream_query}"

    async def create_channel(self, channel: str) -> None:
        client = self.client()
        try:
            status, answer = await client.post("/channels", compact({"name": channel}))
        finally:
            client.close()
        if status not in (201, 409):
            raise RuntimeError(f"ssehub: creating channel {channel}: {status} {answer[:200]!r}")

    async def publish_many(self, channel: str, data: list[dict[str, Any]]) -> None:
        client = self.client()
        try:
            for start in range(0, len(data), BATCH):
                events = [{"data": item} for item in data[start : start + BATCH]]
                path = self.publish_path(channel) + "/batch"
                status, answer = await client.post(path, compact({"events": events}))
                if status != 201:
                    raise RuntimeError(f"ssehub: batch answered {status}: {answer[:200]!r}")
        finally:
            client.close()

    def restart(self) -> bool:
        """A new process on the same database and port: every cache is cold, as
        after a deploy; the stream token stays valid (same secret key)."""
        Target.stop(self)
        self.process = _spawn(self.command, self.env)
        _wait_ready(self.port, "/readyz", self.process)
        return True

    def stop(self) -> None:
        super().stop()
        if self.owns_database:
            asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))


def start_ssehub(channels: list[str]) -> Ssehub:
    database = f"ssehub_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin_sql(f'CREATE DATABASE "{database}"'))
    target = launch_ssehub(database)
    for channel in channels:
        httpx.post(
            f"http://{HOST}:{target.port}/channels", json={"name": channel}, headers=target.headers
        )
    return target


def launch_ssehub(
    database: str, extra_env: dict[str, str] | None = None, owns_database: bool = True
) -> Ssehub:
    """One ``ssehub serve`` on an existing database, pinned to CPU 0, logged in as
    the bench's admin. Several may share a database (``bench.scaling``): only the
    one that ``owns_database`` drops it when it stops."""
    port = _free_port()
    env = {
        **os.environ,
        "SSEHUB_DATABASE_URL": database_url(database, "postgresql+asyncpg"),
        "SSEHUB_SECRET_KEY": SECRET,
        "SSEHUB_ADMIN_USERNAME": ADMIN[0],
        "SSEHUB_ADMIN_PASSWORD": ADMIN[1],
        "SSEHUB_MAX_STREAMS_PER_USER": "1000000",
        # Streams of one repetition may not all be gone when the next opens its 10,000.
        "SSEHUB_MAX_CONNECTIONS": "100000",
        # All of them come from one address, the load generator's.
        "SSEHUB_MAX_CONNECTIONS_PER_CLIENT": "100000",
        # The others run without an access log too.
        "SSEHUB_ACCESS_LOG": "false",
        **(extra_env or {}),
    }
    command = ["taskset", "-c", "0", sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    process = _spawn(command, env)
    _wait_ready(port, "/readyz", process)
    base = f"http://{HOST}:{port}"
    token = httpx.post(
        f"{base}/auth/token", data={"username": ADMIN[0], "password": ADMIN[1]}
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    stream_token = httpx.post(f"{base}/auth/stream-token", headers=headers).json()["stream_token"]
    return Ssehub(
        "ssehub",
        port,
        process,
        headers,
        database=database,
        stream_query=f"access_token={stream_token}",
        command=command,
        env=env,
        owns_database=owns_database,
    )


# -- Nchan -------------------------------------------------------------------------


@dataclass
class Nchan(Target):
    workdir: Path = Path()
    published: int = 0
    has_history: ClassVar[bool] = True

    def publish_body(self, channel: str, data: dict[str, Any]) -> bytes:
        """The event object ssehub would put in its frame's ``data:``, so both send
        frames of the same size and the load generator reads the same bytes per
        event from each (the report shows bytes/event)."""
        self.published += 1
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        envelope = {
            "id": self.published,
            "channel": channel,
            "type": "message",
            "data": data,
            "published_at": at,
        }
        return compact(envelope)

    def event_id(self, answer: bytes) -> str:
        """Nchan's own id of the message (``<time>:<tag>``), the one its stream sends as ``id:``."""
        return str(json.loads(answer)["last_message_id"])

    async def publish_many(self, channel: str, data: list[dict[str, Any]]) -> None:
        """Nchan takes one message per request: 8 connections in turn keep it busy.
        Order across them does not matter: every one comes after the anchor."""
        parts = 8
        await asyncio.gather(
            *(Target.publish_many(self, channel, data[i::parts]) for i in range(parts))
        )

    def stop(self) -> None:
        super().stop()
        log = self.workdir / "error.log"
        if log.exists() and "[emerg]" in log.read_text():
            print(f"[nchan] nginx error log:\n{log.read_text()[-2000:]}", flush=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_nchan() -> Nchan:
    if not Path(NCHAN_MODULE).exists() or not Path(NGINX).exists():
        raise SystemExit(
            f"bench: Nchan needs nginx ({NGINX}) and its module ({NCHAN_MODULE}): "
            "apt-get install nginx-light libnginx-mod-nchan"
        )
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="ssehub-bench-nchan-"))
    workdir.chmod(0o755)  # started by root, nginx's worker runs as nobody
    conf = workdir / "nginx.conf"
    conf.write_text(
        NCHAN_CONF.read_text()
        .replace("@MODULE@", NCHAN_MODULE)
        .replace("@WORKDIR@", str(workdir))
        .replace("@PORT@", str(port))
    )
    command = ["taskset", "-c", "0", NGINX, "-p", f"{workdir}/", "-e", str(workdir / "error.log")]
    command += ["-c", str(conf), "-g", "daemon off;"]
    process = _spawn(command, dict(os.environ))
    try:
        _wait_ready(port, "/ready", process)
    except RuntimeError:
        print((workdir / "error.log").read_text()[-2000:], flush=True)
        raise
    headers = {"Accept": "application/json", "X-EventSource-Event": "message"}
    return Nchan("nchan", port, process, headers, workdir=workdir)


# -- the tutorial --------------------------------------------------------------------


def start_tutorial(module: str = "app") -> Target:
    """The tutorial (``app``) or the same with a lean response (``lean``)."""
    port = _free_port()
    command = ["taskset", "-c", "0", sys.executable, "-m", "uvicorn"]
    command += [f"bench.baseline.{module}:app", "--port", str(port), "--log-level", "warning"]
    process = _spawn(command, dict(os.environ))
    _wait_ready(port, "/docs", process)
    return Target("baseline" if module == "app" else module, port, process)


def start(name: str) -> Target:
    if name == "ssehub":
        return start_ssehub(["idle", "fanout"])
    if name == "nchan":
        return start_nchan()
    return start_tutorial("lean" if name == "lean" else "app")


# -- helpers -------------------------------------------------------------------------


async def admin_sql(statement: str) -> None:
    conn = await asyncpg.connect(PG)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def database_url(database: str, scheme: str = "postgresql") -> str:
    return PG.replace("postgresql://", f"{scheme}://").rsplit("/", 1)[0] + f"/{database}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _wait_ready(port: int, path: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}{path}", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server not ready")
