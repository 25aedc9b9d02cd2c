"""The ordering guarantee: ids become visible in increasing order, on every instance.

Publishers on two server processes (so two writers, two connections pools)
mix single events and batches while a reader keeps asking for "everything
after the last id I saw". With a plain identity column this loses events: a
transaction holding a smaller id commits after a larger one was read. The
reader must end with every published id, once each, in increasing order.
"""

from __future__ import annotations

import random
import threading
import time

import httpx

from tests.support import Api, Server

PUBLISHERS = 12
SECONDS = 3.0


def test_reader_polling_after_last_seen_misses_nothing(start_server) -> None:
    servers: list[Server] = [start_server(), start_server()]
    admin = Api(servers[0].url).admin()
    httpx.post(f"{servers[0].url}/channels", json={"name": "ordered"}, headers=admin)
    published: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def publish(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=servers[seed % 2].url, headers=admin, timeout=30) as client:
            while not stop.is_set():
                if rng.random() < 0.3:
                    events = [{"data": i} for i in range(rng.randint(2, 20))]
                    r = client.post("/channels/ordered/events/batch", json={"events": events})
                    ids = [e["id"] for e in r.json()["events"]]
                else:
                    r = client.post("/channels/ordered/events", json={"data": seed})
                    ids = [r.json()["id"]]
                assert r.status_code == 201
                with lock:
                    published.extend(ids)

    seen: list[int] = []

    def read() -> None:
        with httpx.Client(base_url=servers[1].url, headers=admin, timeout=30) as client:
            after = 0
            while True:
                page = client.get(f"/channels/ordered/events?after={after}&limit=1000").json()
                ids = [e["id"] for e in page["events"]]
                seen.extend(ids)
                if ids:
                    after = ids[-1]
                elif stop.is_set() and drained.is_set():
                    return

    drained = threading.Event()
    reader = threading.Thread(target=read)
    reader.start()
    publishers = [threading.Thread(target=publish, args=(i,)) for i in range(PUBLISHERS)]
    for t in publishers:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in publishers:
        t.join()
    drained.set()
    reader.join(30)
    assert len(published) > 200, "too little concurrency to mean anything"
    assert seen == sorted(set(seen)), "an id was seen twice or out of order"
    missing = sorted(set(published) - set(seen))
    assert not missing, (
        f"{len(missing)} of {len(published)} events lost behind the cursor: {missing[:10]}"
    )
