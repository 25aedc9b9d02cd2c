"""What ssehub puts on NATS, byte for byte: subjects, payloads, seals, and the checks.

``app.realtime.nats_broker`` explains why the messages are what they are;
this module only says how they are written and read. Every check a message
must pass before the chain (``app.realtime.nats_chain``) sees it is here:

- it opens with the deployment's key on its own subject and is not a copy
  (``app.realtime.seal``), else it is ``unsealed`` or ``replayed``;
- its fields are of the shape ssehub sends (ids, strings, ``data`` one line
  of JSON, timestamps with their zone), else it is ``malformed``.

Frames are built by ``app.realtime.sse`` from the checked events, never
from the message's bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from app.events.log import StoredEvent, format_timestamp
from app.realtime.nats_chain import Tx
from app.realtime.seal import ReplayGuard, Sealer, Unsealable

# What a sealed message that is not of the shape ssehub sends raises in the checks
# (orjson's JSONDecodeError is a ValueError).
MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def subject_namespace(key: str, cluster: str, database: str) -> str:
    """The part of every subject that sets deployments sharing one NATS apart.

    Channel ids repeat across databases, so two deployments must not share
    subjects: each would receive, and have to drop, the other's messages. The
    instances of one deployment share their database and
    (``app.auth.signing_key`` enforces it) their signing key; another
    deployment differs in the Postgres cluster (its system identifier), the
    database's name or the key. An HMAC keyed with the signing key, so a
    subject reveals none of them. Subjects only route: what keeps a
    deployment's messages its own is the seal, which binds this namespace
    (``app.realtime.seal``)."""
    label = f"ssehub nats subjects v1|{cluster}|{database}".encode()
    return hmac.new(key.encode(), label, hashlib.sha256).hexdigest()[:16]


async def database_identity(conn: Any) -> tuple[str, str]:
    """The Postgres cluster's system identifier ("" where a provider hides it)
    and the database's name."""
    database = await conn.fetchval("SELECT current_database()")
    try:
        cluster = await conn.fetchval("SELECT system_identifier::text FROM pg_control_system()")
    except asyncpg.PostgresError:
        cluster = ""
    return str(cluster), str(database)


class Wire:
    """One deployment's subjects and seal: encodes what this instance sends,
    opens what it receives."""

    def __init__(self, secret_key: str, namespace: str) -> None:
        self.tx_subject = f"ssehub.{namespace}.tx"
        self._events_prefix = f"ssehub.{namespace}.ev."
        self._sealer = Sealer(secret_key, namespace)
        self._replays = ReplayGuard()

    def subject(self, channel_id: int) -> str:
        return f"{self._events_prefix}{channel_id}"

    def forget(self, channel_id: int) -> None:
        """The channel's subject is no longer followed: its replay record goes."""
        self._replays.forget(self.subject(channel_id))

    def transaction(self, events: list[StoredEvent], tx_prev: int) -> list[tuple[str, Any]]:
        """A committed transaction's messages, in the order they must be sent:
        each channel's events, then ``ssehub.<ns>.tx``. Sealed by ``seal`` as
        they are sent, so that counters rise in the order of sending."""
        by_channel: defaultdict[int, list[list[Any]]] = defaultdict(list)
        for e in events:
            row = [e.id, e.channel, e.type, e.data, format_timestamp(e.published_at)]
            by_channel[e.channel_id].append(row)
        top = events[-1].id
        messages = [
            (self.subject(channel_id), {"tx": top, "e": rows})
            for channel_id, rows in by_channel.items()
        ]
        messages.append((self.tx_subject, {"max": top, "prev": tx_prev, "ch": list(by_channel)}))
        return messages

    def seal(self, subject: str, payload: Any) -> bytes:
        return self._sealer.seal(subject, orjson.dumps(payload))

    def open(self, subject: str, message: bytes) -> bytes | str:
        """The payload of a fresh message of this deployment's, or why it is
        dropped (``"unsealed"``, ``"replayed"``). No await: the replay check
        and its record happen in the order the subscription delivers
        (``app.realtime.seal``)."""
        try:
            opened = self._sealer.open(subject, message)
        except Unsealable:
            return "unsealed"
        if not self._replays.fresh(subject, opened):
            return "replayed"
        return opened.payload

    @staticmethod
    def channel_of(subject: str) -> int:
        return int(subject.rsplit(".", 1)[1])


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"not an id: {value!r}")
    return value


def _text(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"not a string: {value!r}")
    return value


def decode_transaction(payload: bytes, arrived: float) -> Tx:
    """``{"max", "prev", "ch"}``, checked: ``prev < max``, channel ids."""
    data = orjson.loads(payload)
    tx = Tx(_int(data["max"]), _int(data["prev"]), tuple(_int(c) for c in data["ch"]), arrived)
    if tx.prev >= tx.max:
        raise ValueError("a transaction ends after the one before it")
    return tx


def decode_channel_events(payload: bytes, channel_id: int) -> tuple[int, list[StoredEvent]]:
    """``{"tx", "e": [[id, channel, type, data, published_at], ...]}``, checked:
    ids increasing up to ``tx``, strings where strings go, ``data`` one line
    of valid JSON, a timestamp with its zone."""
    data = orjson.loads(payload)
    top = _int(data["tx"])
    events: list[StoredEvent] = []
    for row in data["e"]:
        event_id, channel, type_, text, published = row
        event = StoredEvent(
            _int(event_id),
            channel_id,
            _text(channel),
            _text(type_),
            _json_line(text),
            _timestamp(published),
        )
        if event.id > top or (events and event.id <= events[-1].id):
            raise ValueError("event ids out of order")
        events.append(event)
    return top, events


def _json_line(value: Any) -> str:
    text = _text(value)
    if "\n" in text or "\r" in text:
        raise ValueError("data is not one line")
    orjson.loads(text)
    return text


def _timestamp(value: Any) -> datetime:
    at = datetime.fromisoformat(_text(value))
    if at.tzinfo is None:
        raise ValueError("a timestamp without its zone")
    return at
