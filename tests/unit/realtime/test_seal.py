"""Sealing NATS messages (``app.realtime.seal``): only the deployment opens them,
unaltered, on their own subject, and a copy is told from the original."""

from __future__ import annotations

import orjson
import pytest

from app.realtime.seal import OVERHEAD, ReplayGuard, Sealer, Unsealable

KEY = "the-deployments-signing-key-0123456789-abcdefgh"
NAMESPACE = "6f15fa9689e66949"
SUBJECT = f"ssehub.{NAMESPACE}.ev.7"
PAYLOAD = orjson.dumps({"tx": 5, "e": [[5, "news", "message", '{"secret":"PLAIN"}', "x"]]})


def test_another_instance_of_the_deployment_opens_what_one_sealed() -> None:
    sender, receiver = Sealer(KEY, NAMESPACE), Sealer(KEY, NAMESPACE)
    first, second = sender.seal(SUBJECT, PAYLOAD), sender.seal(SUBJECT, PAYLOAD)
    opened = [receiver.open(SUBJECT, first), receiver.open(SUBJECT, second)]
    assert [o.payload for o in opened] == [PAYLOAD, PAYLOAD]
    assert [o.counter for o in opened] == [1, 2]
    assert {o.sender for o in opened} == {sender.sender} != {receiver.sender}
    assert len(first) == len(PAYLOAD) + OVERHEAD


def test_a_sealed_message_shows_nothing_of_its_payload() -> None:
    sealer = Sealer(KEY, NAMESPACE)
    sealed = [sealer.seal(SUBJECT, PAYLOAD) for _ in range(2)]
    for message in sealed:
        assert b"PLAIN" not in message and b"news" not in message
    assert sealed[0][OVERHEAD:] != sealed[1][OVERHEAD:]  # a fresh nonce each time


@pytest.mark.parametrize(
    ("key", "namespace", "subject"),
    [
        ("another-deployments-signing-key-0123456789-abcd", NAMESPACE, SUBJECT),
        (KEY, "0000000000000000", SUBJECT),  # the same key, another database
        (KEY, NAMESPACE, f"ssehub.{NAMESPACE}.ev.8"),  # moved to another channel
        (KEY, NAMESPACE, f"ssehub.{NAMESPACE}.tx"),
    ],
)
def test_a_message_opens_only_with_the_key_namespace_and_subject_it_was_sealed_for(
    key: str, namespace: str, subject: str
) -> None:
    sealed = Sealer(key, namespace).seal(subject, PAYLOAD)
    with pytest.raises(Unsealable):
        Sealer(KEY, NAMESPACE).open(SUBJECT, sealed)


def test_any_altered_byte_and_anything_unsealed_is_refused() -> None:
    sealed = Sealer(KEY, NAMESPACE).seal(SUBJECT, PAYLOAD)
    receiver = Sealer(KEY, NAMESPACE)
    for at in range(len(sealed)):  # the header, the ciphertext and the tag alike
        altered = bytearray(sealed)
        altered[at] ^= 0x01
        with pytest.raises(Unsealable):
            receiver.open(SUBJECT, bytes(altered))
    for message in (PAYLOAD, b"", sealed[: OVERHEAD - 1], sealed[:-1]):
        with pytest.raises(Unsealable):
            receiver.open(SUBJECT, message)
    assert receiver.open(SUBJECT, sealed).payload == PAYLOAD


def test_the_replay_guard_takes_each_message_once_per_subject() -> None:
    a, b = Sealer(KEY, NAMESPACE), Sealer(KEY, NAMESPACE)
    receiver, guard = Sealer(KEY, NAMESPACE), ReplayGuard()
    tx = f"ssehub.{NAMESPACE}.tx"
    a1, a2, b1 = a.seal(SUBJECT, PAYLOAD), a.seal(tx, PAYLOAD), b.seal(SUBJECT, PAYLOAD)
    a3 = a.seal(SUBJECT, PAYLOAD)
    assert guard.fresh(SUBJECT, receiver.open(SUBJECT, a1))
    assert guard.fresh(tx, receiver.open(tx, a2))  # its own record per subject
    assert guard.fresh(SUBJECT, receiver.open(SUBJECT, b1))  # and per sender
    assert not guard.fresh(SUBJECT, receiver.open(SUBJECT, a1))  # a copy
    assert not guard.fresh(tx, receiver.open(tx, a2))
    assert guard.fresh(SUBJECT, receiver.open(SUBJECT, a3))
    assert not guard.fresh(SUBJECT, receiver.open(SUBJECT, a1))  # an older one, after
    guard.forget(SUBJECT)
    assert guard.fresh(SUBJECT, receiver.open(SUBJECT, a1))


def test_the_replay_guard_keeps_a_bounded_number_of_senders() -> None:
    guard, receiver = ReplayGuard(senders=2), Sealer(KEY, NAMESPACE)
    sealers = [Sealer(KEY, NAMESPACE) for _ in range(3)]
    firsts = [receiver.open(SUBJECT, s.seal(SUBJECT, PAYLOAD)) for s in sealers]
    assert all(guard.fresh(SUBJECT, opened) for opened in firsts)
    assert not guard.fresh(SUBJECT, firsts[2])
    assert guard.fresh(SUBJECT, firsts[0])  # the least recently heard was forgotten
