"""The chaos run: the streams' guarantee while publishers, readers and instances all move.

Publishers on every instance (single events and batches, on random channels);
readers that drop their connection at random and resume with their last id,
each time on a random instance: one per channel (``/channels/{c}/stream``) and
one per user (``/stream``, the user subscribed to two or three of the
channels). Every reader is live before the first publish, so at the end each
must hold exactly the history of its channels, read back with ``GET
/channels/{c}/events``: every id once, in increasing order.

``during`` runs once in the middle of the publishing (a broker restart, a cut
connection...); publishing goes on for a while after it returns, so readers
see the disruption and what follows it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import httpx

from tests.support import Hubs, read_history
from tests.support.sse import SseStream

COLORS = ("red", "green", "blue", "amber")
READERS_DONE_SECONDS = 30  # after the last publish: the slowest path (the safety net) is ~4 s


@dataclass
class ChaosReader:
    label: str
    path: str
    token: str
    channels: list[str]
    got: list[int] = field(default_factory=list)
    connections: int = 0
    expected: list[int] = field(default_factory=list)


@dataclass
class ChaosRun:
    readers: list[ChaosReader]
    history: dict[str, list[int]]
    setup_seconds: float  # channels, subscriptions, readers live
    publishing_seconds: float
    tail_seconds: float  # from the last publish until every reader had everything

    def __str__(self) -> str:
        return (
            f"{self.events} events, {len(self.readers)} readers "
            f"({sum(r.connections for r in self.readers)} connections); setup "
            f"{self.setup_seconds:.1f} s, publishing {self.publishing_seconds:.1f} s, "
            f"tail {self.tail_seconds:.1f} s"
        )

    @property
    def events(self) -> int:
        return sum(len(ids) for ids in self.history.values())


def run_chaos(
    hubs: Hubs,
    bases: Sequence[str],
    users: Sequence[dict[str, str]],
    *,
    tag: str,
    seconds: float = 3.0,
    during: Callable[[], None] | None = None,
    seed: int = 0,
    publishers: int = 4,
) -> ChaosRun:
    """One run on fresh channels named ``{tag}-{color}``; ``users`` (auth headers)
    read ``/stream`` with their subscriptions replaced by two or three of them.
    Asserts the guarantee; returns what happened, for the caller's own checks."""
    rng = random.Random(seed)
    began = time.monotonic()
    admin = hubs.admin
    channels = [f"{tag}-{color}" for color in COLORS]
    for name in channels:
        hubs.channel(name)
    admin_token = hubs.stream_token(admin)
    readers = [
        ChaosReader(f"/channels/{c}/stream", f"/channels/{c}/stream", admin_token, [c])
        for c in channels
    ]
    for i, user in enumerate(users):
        mine = rng.sample(channels, 2 + i % 2)
        _subscribe_only(hubs, user, mine)
        readers.append(
            ChaosReader(f"/stream of user {i} {mine}", "/stream", hubs.stream_token(user), mine)
        )

    published: dict[str, list[int]] = {c: [] for c in channels}
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    published_all = threading.Event()  # set once the history is read back
    give_up = threading.Event()
    live = threading.Semaphore(0)

    def guarded(work: Callable[[], None], name: str) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # reported by the main thread
                with lock:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                live.release()

        return run

    def publisher(seed: int) -> None:
        prng = random.Random(seed)
        with httpx.Client(headers=admin, timeout=30) as client:
            while not stop.is_set():
                channel = prng.choice(channels)
                base = prng.choice(bases)
                if prng.random() < 0.3:
                    r = client.post(
                        f"{base}/channels/{channel}/events/batch",
                        json={"events": [{"data": i} for i in range(prng.randint(2, 8))]},
                    )
                    assert r.status_code == 201, r.text
                    new = [e["id"] for e in r.json()["events"]]
                else:
                    r = client.post(f"{base}/channels/{channel}/events", json={"data": seed})
                    assert r.status_code == 201, r.text
                    new = [r.json()["id"]]
                with lock:
                    published[channel] += new

    def reader(r: ChaosReader, index: int) -> None:
        rrng = random.Random(seed * 1000 + index)
        last: int | None = None
        while not give_up.is_set():
            # The first connection starts live (no position) before any publish;
            # every later one resumes, on any instance.
            base = bases[index % len(bases)] if last is None else rrng.choice(bases)
            query = "" if last is None else f"last_event_id={last}&"
            s = SseStream(f"{base}{r.path}?{query}access_token={r.token}")
            r.connections += 1
            if r.connections == 1:
                s.wait_for(lambda st: bool(st.notices("ssehub.live")))
                live.release()
            deadline = time.monotonic() + rrng.uniform(0.05, 0.6)
            while time.monotonic() < deadline and not s.ended:
                if published_all.is_set() and _reached(r, s.ids()):
                    break
                time.sleep(0.01)
            s.close()
            ids = s.ids()
            r.got += ids
            if ids:
                last = ids[-1]
            elif last is None:
                last = 0  # everything of these fresh channels, from now on
            if published_all.is_set() and _reached(r, r.got):
                return

    reader_threads = [
        threading.Thread(target=guarded(lambda r=r, i=i: reader(r, i), r.label), daemon=True)
        for i, r in enumerate(readers)
    ]
    for t in reader_threads:
        t.start()
    for _ in readers:
        assert live.acquire(timeout=15), "a reader never went live"
    assert not errors, errors

    started = time.monotonic()
    setup_seconds = started - began
    publisher_threads = [
        threading.Thread(target=guarded(lambda i=i: publisher(seed * 100 + i), f"publisher {i}"))
        for i in range(publishers)
    ]
    for t in publisher_threads:
        t.start()
    time.sleep(seconds / 3)
    if during is not None:
        during()
    time.sleep(max(1.0, seconds - (time.monotonic() - started)))
    stop.set()
    for t in publisher_threads:
        t.join(30)
    publishing_seconds = time.monotonic() - started
    assert not errors, errors

    history = {
        c: [e["id"] for e in read_history(rng.choice(bases), hubs.admin, c)] for c in channels
    }
    for r in readers:
        r.expected = sorted(i for c in r.channels for i in history[c])
    published_all.set()
    deadline = time.monotonic() + READERS_DONE_SECONDS
    for t in reader_threads:
        t.join(max(0.0, deadline - time.monotonic()))
    give_up.set()
    tail_seconds = time.monotonic() - started - publishing_seconds
    assert not errors, errors

    for c in channels:
        assert history[c] == sorted(published[c]), f"{c}: the history is not what was published"
    for r in readers:
        assert r.expected, f"{r.label}: nothing published on its channels"
        got = r.got
        disorder = [(a, b) for a, b in pairwise(got) if a >= b]
        assert not disorder, f"{r.label}: duplicate or out of order at {disorder[:5]}"
        missing = sorted(set(r.expected) - set(got))
        extra = sorted(set(got) - set(r.expected))
        assert got == r.expected, (
            f"{r.label}: {len(got)} of {len(r.expected)} ids; "
            f"missing {missing[:10]} ({len(missing)}), extra {extra[:10]}"
        )
        assert r.connections >= 2, f"{r.label}: never resumed"
    return ChaosRun(readers, history, setup_seconds, publishing_seconds, tail_seconds)


def _reached(r: ChaosReader, ids: list[int]) -> bool:
    if not r.expected:
        return True
    return bool(ids) and ids[-1] >= r.expected[-1]


def _subscribe_only(hubs: Hubs, user: dict[str, str], channels: list[str]) -> None:
    """Make ``channels`` the user's stored subscriptions, and nothing else."""
    http = hubs.api.http
    r = http.get("/me/subscriptions", headers=user)
    assert r.status_code == 200, r.text
    for old in r.json():
        assert http.delete(f"/me/subscriptions/{old['channel']}", headers=user).status_code == 204
    for name in channels:
        r = http.put(f"/me/subscriptions/{name}", headers=user)
        assert r.status_code == 201, r.text
