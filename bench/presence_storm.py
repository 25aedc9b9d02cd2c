"""A reconnect storm on one presence channel: what it costs and how long until
every stream holds the whole list.

    python -m bench.presence_storm [--streams 2000]

One ``ssehub serve`` (pinned to CPU 0, as in ``python -m bench``), one channel
with presence on, N users with one stream each. Two phases:

1. **first connect**: all N streams open at once; every stream must come to
   hold all N users (its ``ssehub.presence`` list plus the joins after it);
2. **reconnect**: all N close at once and, a second later (four turns: every
   lease is in its grace by then), open again at once; nobody leaves or
   joins, and every new stream must hold all N users again.

For each phase it prints the lease rows written, the write transactions, the
join and leave notices the streams received, and the seconds from the first
connect until the last stream held the whole list. Run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

import asyncpg
import httpx

from app.auth.tokens import issue_token
from app.config import Settings
from bench.loadgen import get_request
from bench.targets import HOST, SECRET, Ssehub, admin_sql, database_url, launch_ssehub
from tests.support.api import metric

CHANNEL = "room"
FRAME = re.compile(rb"event: (ssehub\.(?:presence|join|leave))\ndata: ([^\n]*)\n\n")


class PresenceReader(asyncio.Protocol):
    """One stream: keeps the list its notices add up to."""

    def __init__(self, request: bytes, want: int, done: asyncio.Event, tally: dict[str, int]):
        self.request, self.want, self.done, self.tally = request, want, done, tally
        self.users: set[str] | None = None
        self.full_at = 0.0
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data.replace(b"\r\n", b"\n")
        end = self.buffer.rfind(b"\n\n")
        if end < 0:
            return
        complete, self.buffer = self.buffer[: end + 2], self.buffer[end + 2 :]
        for kind, payload in FRAME.findall(complete):
            body = json.loads(payload)
            if kind == b"ssehub.presence":
                self.tally["ssehub.presence"] += 1
                self.users = {user["username"] for user in body["users"]}
            elif self.users is not None:
                self.tally[kind.decode()] += 1
                if kind == b"ssehub.join":
                    self.users.add(body["username"])
                else:
                    self.users.discard(body["username"])
        if not self.full_at and self.users is not None and len(self.users) >= self.want:
            self.full_at = time.monotonic()
            self.tally["full"] += 1
            if self.tally["full"] == self.want:  # one stream per user: all of them
                self.done.set()


READERS: list[PresenceReader] = []


async def phase(target: Ssehub, tokens: list[str], label: str, reconnect: bool) -> dict[str, Any]:
    base = f"http://{HOST}:{target.port}"
    writes = metric(base, "ssehub_presence_lease_writes_total")
    batches = metric(base, "ssehub_presence_write_transactions_total")
    if reconnect:
        close_all()
        await asyncio.sleep(1.0)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    tally = {"ssehub.presence": 0, "ssehub.join": 0, "ssehub.leave": 0, "full": 0}
    READERS.clear()
    began = time.monotonic()
    gate = asyncio.Semaphore(500)

    async def one(token: str) -> None:
        path = f"/channels/{CHANNEL}/stream?access_token={token}"
        async with gate:
            await loop.create_connection(
                lambda: _reader(get_request(HOST, target.port, path), len(tokens), done, tally),
                HOST,
                target.port,
            )

    await asyncio.gather(*(one(token) for token in tokens))
    await asyncio.wait_for(done.wait(), 300)
    full = max(reader.full_at for reader in READERS) - began
    await asyncio.sleep(1.0)  # let the turn after settle: it must write nothing more
    return {
        "phase": label,
        "streams": len(tokens),
        "seconds_until_every_stream_has_the_list": round(full, 2),
        "lease_rows_written": int(metric(base, "ssehub_presence_lease_writes_total") - writes),
        "write_transactions": int(
            metric(base, "ssehub_presence_write_transactions_total") - batches
        ),
        "lists_received": tally["ssehub.presence"],
        "joins_received": tally["ssehub.join"],
        "leaves_received": tally["ssehub.leave"],
    }


def _reader(
    request: bytes, want: int, done: asyncio.Event, tally: dict[str, int]
) -> PresenceReader:
    reader = PresenceReader(request, want, done, tally)
    READERS.append(reader)
    return reader


def close_all() -> None:
    for reader in READERS:
        if reader.transport is not None:
            reader.transport.close()


async def run(streams: int) -> list[dict[str, Any]]:
    database = f"ssehub_bench_presence_{int(time.time())}"
    await admin_sql(f'CREATE DATABASE "{database}"')
    target = await asyncio.to_thread(
        launch_ssehub, database, {"SSEHUB_PRESENCE_GRACE_SECONDS": "10"}
    )
    try:
        base = f"http://{HOST}:{target.port}"
        r = httpx.post(
            f"{base}/channels", json={"name": CHANNEL, "presence": True}, headers=target.headers
        )
        assert r.status_code == 201, r.text
        conn = await asyncpg.connect(database_url(database))
        try:
            ids = await conn.fetch(
                "INSERT INTO public.users (username, password_hash) "
                "SELECT 'user' || g, NULL FROM generate_series(1, $1::int) g RETURNING id",
                streams,
            )
        finally:
            await conn.close()
        settings = Settings(secret_key=SECRET, database_url=database_url(database))
        tokens = [issue_token(settings, row[0], "stream")[0] for row in ids]
        first = await phase(target, tokens, "first connect", reconnect=False)
        again = await phase(target, tokens, "reconnect within the grace", reconnect=True)
        close_all()
        return [first, again]
    finally:
        await asyncio.to_thread(target.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=2000)
    args = parser.parse_args()
    for row in asyncio.run(run(args.streams)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
