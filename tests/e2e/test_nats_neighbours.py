"""NATS's other clients: without ``SSEHUB_SECRET_KEY`` they read nothing, forge nothing, stop nothing.

A real nats-server and two real instances on it (A publishes, B streams: B
gets A's events over NATS), and a raw nats-py client of the test's
(``RawNatsClient``) subscribed to ``>``: the neighbour that a shared NATS
server lets in. It reads everything that passes, and publishes forged,
altered and replayed messages on ssehub's own subjects. B must drop each one
(counted in ``ssehub_nats_dropped_total``), add no frame, keep its position,
and go on delivering what is published afterwards, to its open streams and
to new ones.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.support import (
    NATS_SERVER,
    TEST_SECRET,
    Api,
    Hubs,
    NatsServer,
    RawNatsClient,
    Server,
    counter_by_label,
    sql,
    wait_until,
)
from tests.support.sse import SseStream

pytestmark = pytest.mark.skipif(
    not Path(NATS_SERVER).exists(), reason="nats-server is not installed (.ci/run installs it)"
)

CHANNEL = "secret-plans-k2v9"  # private; its name must not pass NATS in clear either
CANARY = "PLAINTEXT-CANARY-q7Xz"
ENV = {"SSEHUB_BROKER": "nats", "SSEHUB_ACCESS_LOG": "false"}


def _dropped(base: str) -> defaultdict[str, float]:
    """``ssehub_nats_dropped_total`` of one instance, by reason."""
    return counter_by_label(base, "ssehub_nats_dropped_total", "reason")


@pytest.fixture(scope="module")
def pair(nats_server: NatsServer, database_url: str) -> Iterator[tuple[Server, Server]]:
    env = {**ENV, "SSEHUB_NATS_URL": nats_server.url}
    a, b = Server(database_url, env=env), Server(database_url, env=env)
    try:
        with ThreadPoolExecutor(2) as pool:  # together: each takes seconds to start
            for started in [pool.submit(srv.start) for srv in (a, b)]:
                started.result()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def spy(nats_server: NatsServer) -> Iterator[RawNatsClient]:
    client = RawNatsClient(nats_server.url).subscribe(">")
    yield client
    client.close()


@dataclass
class Scene:
    """B streams ``CHANNEL``; A published ``first`` on it, which the stream got,
    and the spy saw A's messages for it (``genuine``) on the subjects it learnt."""

    hubs: Hubs
    a: Server
    b: Server
    stream: SseStream
    channel_id: int
    first: int
    tx_subject: str
    events_subject: str
    genuine: list[tuple[str, bytes]]

    def publish(self, data: str) -> int:
        return self.hubs.publish(CHANNEL, data, base=self.a.url)

    def delivery_goes_on(self) -> None:
        """What A publishes now reaches B's open stream right after ``first`` (no
        frame added, none repeated), and reaches a stream opened on B now too."""
        after = self.publish("after")
        assert self.stream.wait_ids(2) == [self.first, after]
        token = self.hubs.stream_token(self.hubs.admin)
        fresh = self.hubs.open(f"/channels/{CHANNEL}/stream", token, base=self.b.url)
        fresh.wait_for(lambda s: bool(s.notices("ssehub.live")))
        later = self.publish("later")
        assert fresh.wait_ids(1) == [later]
        assert self.stream.wait_ids(3) == [self.first, after, later]
        assert b"forged" not in self.stream.raw
        assert b"forged" not in fresh.raw

    def dropped_grows(self, before: dict[str, float], reason: str, by: int) -> None:
        """B counted exactly ``by`` more messages dropped for ``reason``."""
        wait_until(
            lambda: _dropped(self.b.url)[reason] - before[reason] >= by,
            f"B to count {by} more dropped ({reason})",
        )
        assert _dropped(self.b.url)[reason] - before[reason] == by


@pytest.fixture
def scene(
    pair: tuple[Server, Server], spy: RawNatsClient, nats_server: NatsServer, database_url: str
) -> Iterator[Scene]:
    a, b = pair
    hubs = Hubs(Api(a.url))
    hubs.channel(CHANNEL, private=True)
    rows = asyncio.run(sql(database_url, "SELECT id FROM channels WHERE name = $1", CHANNEL))
    channel_id = int(rows[0]["id"])
    stream = hubs.open(f"/channels/{CHANNEL}/stream", hubs.stream_token(hubs.admin), base=b.url)
    stream.wait_for(lambda s: bool(s.notices("ssehub.live")))
    # B follows the channel's subject, so it receives A's messages for it.
    following = f".ev.{channel_id}"
    wait_until(
        lambda: any(s.endswith(following) for c in nats_server.subscriptions() for s in c),
        "B to follow the channel",
    )
    spy.clear()
    first = hubs.publish(CHANNEL, {"note": CANARY}, base=a.url)
    assert stream.wait_ids(1) == [first]
    wait_until(
        lambda: bool(spy.messages(".tx")) and bool(spy.messages(following)),
        "the spy to see A's messages",
    )
    genuine = spy.messages()
    try:
        yield Scene(
            hubs=hubs,
            a=a,
            b=b,
            stream=stream,
            channel_id=channel_id,
            first=first,
            tx_subject=spy.messages(".tx")[0][0],
            events_subject=spy.messages(following)[0][0],
            genuine=genuine,
        )
    finally:
        hubs.close_all()
        hubs.api.http.close()


def _sealed(key: str, subject: str, payload: bytes) -> bytes:
    """``payload`` sealed for ``subject`` as an instance with ``key`` would."""
    from app.realtime.seal import Sealer

    namespace = subject.split(".")[1]  # ssehub.<namespace>.tx: visible to every client
    return Sealer(key, namespace).seal(subject, payload)


def test_nats_eavesdropper_on_every_subject_reads_no_event_data(scene: Scene) -> None:
    """Everything ssehub put on NATS for a private channel's event, as the spy
    got it: neither the event's data nor the channel's name is in any of it."""
    assert len(scene.genuine) >= 2
    for subject, payload in scene.genuine:
        assert subject.startswith("ssehub.")
        assert CANARY.encode() not in payload, (subject, payload[:200])
        assert CHANNEL.encode() not in payload, (subject, payload[:200])


@pytest.mark.parametrize("sealing", ["unsealed", "wrong_key"])
def test_nats_forged_huge_max_neither_moves_position_nor_stops_delivery(
    scene: Scene, spy: RawNatsClient, sealing: str
) -> None:
    """A transaction message naming id 10^12, in clear or sealed with a key that
    is not the deployment's: B drops it and counts it; its streams, open and
    new, go on receiving what is published next."""
    forged = orjson.dumps({"max": 10**12, "prev": scene.first, "ch": [scene.channel_id]})
    if sealing == "wrong_key":
        forged = _sealed("another-deployments-key-0123456789-abcdefghij", scene.tx_subject, forged)
    before = _dropped(scene.b.url)
    spy.publish(scene.tx_subject, forged)
    scene.delivery_goes_on()
    scene.dropped_grows(before, "unsealed", 1)


def test_nats_sealed_max_beyond_the_last_issued_id_is_refused(
    scene: Scene, spy: RawNatsClient
) -> None:
    """Defence in depth, for a holder of the key: a transaction that names an id
    the database never issued is checked against the database and dropped
    (counted), and delivery goes on."""
    payload = orjson.dumps({"max": 10**12, "prev": scene.first, "ch": [scene.channel_id]})
    before = _dropped(scene.b.url)
    spy.publish(scene.tx_subject, _sealed(TEST_SECRET, scene.tx_subject, payload))
    scene.delivery_goes_on()
    scene.dropped_grows(before, "beyond_head", 1)


@pytest.mark.parametrize(
    ("sealing", "dropped"),
    [
        ("unsealed", {"unsealed": 2}),
        # A holder of the key: the event fails the checks, the transaction the database's.
        ("with_the_key", {"malformed": 1, "beyond_head": 1}),
    ],
)
def test_nats_forged_events_with_newlines_inject_no_frame(
    scene: Scene, spy: RawNatsClient, sealing: str, dropped: dict[str, int]
) -> None:
    """A forged transaction right after B's position, whose event's data carries
    raw newlines and a whole frame of its own: dropped and counted, no frame
    added, and the real next event (the same id) arrives."""
    forged_id = scene.first + 1
    data = '"x"\n\nid: 999999999\nevent: injected\ndata: {"forged":true}'
    row = [forged_id, CHANNEL, "message", data, "2030-01-01T00:00:00.000000Z"]
    tx = {"max": forged_id, "prev": scene.first, "ch": [scene.channel_id]}
    before = _dropped(scene.b.url)
    for subject, message in (
        (scene.events_subject, {"tx": forged_id, "e": [row]}),
        (scene.tx_subject, tx),
    ):
        payload = orjson.dumps(message)
        if sealing == "with_the_key":
            payload = _sealed(TEST_SECRET, subject, payload)
        spy.publish(subject, payload)
    scene.delivery_goes_on()
    assert not [f for f in scene.stream.frames if f.event == "injected"]
    for reason, count in dropped.items():
        scene.dropped_grows(before, reason, count)


def test_nats_altered_sealed_messages_are_dropped(scene: Scene, spy: RawNatsClient) -> None:
    """ssehub's own messages for ``first``, one bit flipped in each: dropped and
    counted; nothing added, delivery goes on."""
    before = _dropped(scene.b.url)
    for subject, payload in scene.genuine:
        altered = bytearray(payload)
        altered[len(altered) // 2] ^= 0x01
        spy.publish(subject, bytes(altered))
    scene.delivery_goes_on()
    scene.dropped_grows(before, "unsealed", len(scene.genuine))


def test_nats_replayed_sealed_messages_are_dropped(scene: Scene, spy: RawNatsClient) -> None:
    """ssehub's own messages for ``first``, captured and published again, twice:
    dropped and counted as replays; no frame repeated, delivery goes on."""
    before = _dropped(scene.b.url)
    for _ in range(2):
        for subject, payload in scene.genuine:
            spy.publish(subject, payload)
    scene.delivery_goes_on()
    scene.dropped_grows(before, "replayed", 2 * len(scene.genuine))
