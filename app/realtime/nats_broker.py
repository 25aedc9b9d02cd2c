"""``SSEHUB_BROKER=nats``: live events over NATS, only for the channels this instance carries.

With the Postgres broker every instance reads every event from the log: with
k instances the log is read k times. Here the instance that commits a
publishing transaction sends its events over core NATS, and each instance
receives only the channels its open streams carry (it subscribes to a
channel's subject when the hub's first stream carries it, ``Hub.interest``).
Postgres stays the source of truth and the ordering authority; NATS only
carries copies, and anything NATS loses is noticed and read from the log.

**Subjects.** Per committed transaction, in this order on the committer's one
connection (``<ns>`` is the deployment's namespace, ``subject_namespace``),
each message sealed (below):

- ``ssehub.<ns>.ev.<channel_id>``, for each channel it wrote: ``{"tx": max,
  "e": [[id, channel, type, data, published_at], ...]}``;
- ``ssehub.<ns>.tx``, for every instance: ``{"max": max, "prev": prev, "ch": [ids]}``,
  where ``prev`` is ``tx_prev``: the log's head when the transaction appended,
  under the publish lock, so every id up to it is committed. Each transaction
  names the one before it: the transactions form a chain.

NATS delivers one publisher's messages to a subscriber in the order sent, so a
transaction's channel messages come before its ``ssehub.tx`` unless lost.

**Why every carried event reaches the hub once, in id order, with no gap.**
The broker applies transactions strictly along the chain from its
``position`` (every id up to it handed to the hub, for every carried channel):

- ``max <= position``: seen already (a duplicate, two relays for a moment, or
  this instance's own shortcut): dropped.
- ``prev <= position``: next in the chain. For each carried channel it names,
  the channel message must be here: one that is not (lost, dropped by a slow
  consumer, sent before this instance subscribed) is read from the log for
  ``(position, max]``. The events go to the hub in id order; position = max.
- ``prev > position``: something before it is missing or late (two committers'
  messages can cross). It waits ``REORDER_SECONDS`` for the chain to close, then
  reads the carried channels' events in ``(position, prev]`` from the log and
  goes on.
- Nothing arrives at all (the last transactions' messages were lost, NATS is
  down): on the listener's turn the log's head is compared with ``position``;
  behind on two turns running, the carried channels are read from the log up
  to the head.

Which channels are carried is decided at the hand-over, after the last log
read: a stream that registers during a read starts at the hub's position,
below the transaction being applied, so the transaction's events of the
channels it adds are read too before ``position`` passes them.

Every case either delivers the transaction's events of carried channels from
NATS or from the log, and never an id at or below ``position``: NATS losing,
duplicating or reordering messages costs log reads, never exactness. And the
log is read only for carried channels: interest routing holds on the gap
path too. The chain of ``ssehub.tx`` reaches every instance (one small message
per transaction), which is what lets an instance know what it missed.

**What NATS's other clients can do: nothing.** A NATS server may be shared,
and any of its clients can read and publish ssehub's subjects. Every message
is sealed (``app.realtime.seal``): a client without ``SSEHUB_SECRET_KEY``
reads nothing of it, and what such a client publishes is dropped before the
chain sees it, counted in ``ssehub_nats_dropped_total`` by reason:

- ``unsealed``: invented, altered, moved from another subject, or another
  deployment's (the seal binds the key, the namespace and the subject);
- ``replayed``: a copy of a genuine message (``ReplayGuard``). A copy that
  outlives its record is older than ``position`` and ignored there: it
  never names a transaction the chain has not passed, since a genuine one
  is published only after it committed;
- ``malformed``: sealed, so from a holder of the key, but not a message of
  the shape ssehub sends (each field checked, ``data`` one line of JSON);
- ``beyond_head``: a transaction naming an id above the last one the
  database issued (its sequence, asked once whenever a transaction names an
  id above the last answer): position never jumps past real ids, so a
  holder of the key gone wrong cannot stop delivery either.

Frames are built by ``app.realtime.sse`` from the checked events, never
from the message's bytes.

**Why core NATS rather than JetStream.** JetStream's ordered consumers keep
order per stream, not across the subjects of one ``/stream``, and they would
not remove the need for the chain: a committer that dies between its commit
and its publish leaves a hole only the log can fill. The chain makes core
NATS exact at the cost of the log reads that losses need, without a second
store to operate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from app.db import raw_connection
from app.events.log import (
    StoredEvent,
    format_timestamp,
    last_event_id,
    last_issued_id,
    read_page,
)
from app.metrics import Metrics
from app.realtime import nats_client
from app.realtime.broker import BetweenPages
from app.realtime.hub import Hub
from app.realtime.seal import ReplayGuard, Sealer, Unsealable

log = logging.getLogger("ssehub")

REORDER_SECONDS = 0.2
DROP_REASONS = ("unsealed", "replayed", "malformed", "beyond_head")
# Drops are logged at most this often per reason (a flood must not flood the log).
DROP_LOG_SECONDS = 10.0


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


async def _database_identity(conn: Any) -> tuple[str, str]:
    """The Postgres cluster's system identifier ("" where a provider hides it)
    and the database's name."""
    database = await conn.fetchval("SELECT current_database()")
    try:
        cluster = await conn.fetchval("SELECT system_identifier::text FROM pg_control_system()")
    except asyncpg.PostgresError:
        cluster = ""
    return str(cluster), str(database)


@dataclass(frozen=True, slots=True)
class _Tx:
    max: int
    prev: int
    channels: tuple[int, ...]
    arrived: float


class NatsBroker:
    wants_notify = False  # events come over NATS; the log only fills gaps

    def __init__(
        self,
        url: str,
        hub: Hub,
        pool: Any,
        metrics: Metrics,
        secret_key: str,
        pending_limit: int = 512 * 1024,
        creds: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self._url = url
        self._creds = creds
        self._ca_file = ca_file
        self._key = secret_key
        self._sealer: Sealer | None = None  # set in start: the namespace depends on the database
        self._replays = ReplayGuard()
        self._tx_subject = ""  # set in start: they depend on the database
        self._events_subject = ""
        # Past this many unprocessed messages a subscription drops the next ones
        # (nats-py's slow consumer): the chain notices, the log fills them.
        self._pending_limit = pending_limit
        self._hub = hub
        self._pool = pool
        self._metrics = metrics
        self._nc: NatsClient | None = None
        self._subs: dict[int, Subscription] = {}
        self._outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._txs: dict[int, _Tx] = {}  # by max: transactions not applied yet
        self._events: dict[tuple[int, int], list[StoredEvent]] = {}  # (tx max, channel)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Held while position moves by way of an await (a log read): the
        # committer's shortcut and the safety net wait their turn.
        self._moving = asyncio.Lock()
        self._following = asyncio.Lock()
        self._head_seen = (0, 0)  # (position, log head) at the listener's last turn
        # The highest id the database is known to have issued: a transaction
        # naming more is checked with the database before it is applied.
        self._issued = 0
        self._drops_logged: dict[str, float] = {}
        for reason in DROP_REASONS:
            metrics.nats_dropped.labels(reason)
        self.position = 0

    async def start(self, pool: Any) -> None:
        async with raw_connection(pool) as conn:
            self.position = await last_event_id(conn)
            self._issued = await last_issued_id(conn)
            namespace = subject_namespace(self._key, *await _database_identity(conn))
        self._sealer = Sealer(self._key, namespace)
        self._tx_subject = f"ssehub.{namespace}.tx"
        self._events_subject = f"ssehub.{namespace}.ev."
        self._hub.position = self.position
        self._nc = await nats_client.connect(
            self._url,
            self._creds,
            self._ca_file,
            name="ssehub",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        await self._nc.subscribe(
            self._tx_subject, cb=self._on_tx, pending_msgs_limit=self._pending_limit
        )
        self._hub.interest = self._interest
        self._tasks = [
            asyncio.create_task(self._send_forever(), name="nats-send"),
            asyncio.create_task(self._apply_forever(), name="nats-apply"),
        ]

    async def stop(self) -> None:
        self._hub.interest = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.drain(), 2)

    def _subject(self, channel_id: int) -> str:
        return f"{self._events_subject}{channel_id}"

    # -- publishing (the committer) ---------------------------------------------

    def committed(self, events: list[StoredEvent], tx_prev: int) -> None:
        """Send the transaction to every interested instance, and hand it to this
        instance's hub at once if nothing can come between (position == tx_prev)."""
        if not events:
            return
        by_channel: defaultdict[int, list[StoredEvent]] = defaultdict(list)
        for event in events:
            by_channel[event.channel_id].append(event)
        top = events[-1].id
        self._issued = max(self._issued, top)
        for channel_id, mine in by_channel.items():
            rows = [
                [e.id, e.channel, e.type, e.data, format_timestamp(e.published_at)] for e in mine
            ]
            self._outbox.put_nowait((self._subject(channel_id), {"tx": top, "e": rows}))
        tx = {"max": top, "prev": tx_prev, "ch": list(by_channel)}
        self._outbox.put_nowait((self._tx_subject, tx))
        if not self._moving.locked() and self.position == tx_prev:
            self._metrics.broker_events.labels("commit").inc(len(events))
            self._hand_over(events, top)

    async def _send_forever(self) -> None:
        """One sender, so one connection's messages keep their order."""
        while True:
            subject, payload = await self._outbox.get()
            try:
                assert self._nc is not None and self._sealer is not None
                await self._nc.publish(subject, self._sealer.seal(subject, orjson.dumps(payload)))
            except Exception as exc:  # the others notice the hole and read the log
                log.warning("nats: publishing %s failed (%s)", subject, exc)

    # -- receiving --------------------------------------------------------------

    def _interest(self, channel_id: int, carried: bool) -> None:
        asyncio.get_running_loop().create_task(self._follow(channel_id, carried))

    async def _follow(self, channel_id: int, carried: bool) -> None:
        """Subscribe to a channel its first stream carries; unsubscribe after its last."""
        if self._nc is None:
            return
        async with self._following:  # one at a time, each on the hub's state now
            carried = self._hub.carries(channel_id)
            try:
                if carried and channel_id not in self._subs:
                    self._subs[channel_id] = await self._nc.subscribe(
                        self._subject(channel_id),
                        cb=self._on_events,
                        pending_msgs_limit=self._pending_limit,
                    )
                elif not carried and channel_id in self._subs:
                    await self._subs.pop(channel_id).unsubscribe()
                    self._replays.forget(self._subject(channel_id))
            except Exception as exc:  # a message not received is read from the log
                log.warning("nats: following channel %s failed (%s)", channel_id, exc)

    def _open(self, msg: Msg) -> bytes | None:
        """The message's payload if it is a fresh one of this deployment's, else
        None (dropped and counted). No await: the replay check and its record
        happen in the order the subscription delivers (``app.realtime.seal``)."""
        assert self._sealer is not None
        try:
            opened = self._sealer.open(msg.subject, msg.data)
        except Unsealable:
            self._drop("unsealed", msg.subject)
            return None
        if not self._replays.fresh(msg.subject, opened):
            self._drop("replayed", msg.subject)
            return None
        return opened.payload

    def _drop(self, reason: str, subject: str) -> None:
        self._metrics.nats_dropped.labels(reason).inc()
        now = time.monotonic()
        if now - self._drops_logged.get(reason, -DROP_LOG_SECONDS) >= DROP_LOG_SECONDS:
            self._drops_logged[reason] = now
            log.warning(
                "nats: dropped a message on %s (%s); further drops for that reason "
                "are only counted for %.0f s (ssehub_nats_dropped_total)",
                subject,
                reason,
                DROP_LOG_SECONDS,
            )

    async def _on_tx(self, msg: Msg) -> None:
        payload = self._open(msg)
        if payload is None:
            return
        try:
            tx = _transaction(payload)
        except _MALFORMED:
            self._drop("malformed", msg.subject)
            return
        if tx.max > self.position:
            self._txs[tx.max] = tx
            self._wake.set()

    async def _on_events(self, msg: Msg) -> None:
        payload = self._open(msg)
        if payload is None:
            return
        try:
            channel_id = int(msg.subject.rsplit(".", 1)[1])
            top, events = _channel_events(payload, channel_id)
        except _MALFORMED:
            self._drop("malformed", msg.subject)
            return
        if top > self.position:
            self._events[(top, channel_id)] = events
            self._metrics.broker_events.labels("nats").inc(len(events))

    async def _apply_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), REORDER_SECONDS)
            self._wake.clear()
            try:
                await self._apply_ready()
            except Exception as exc:  # the database away: the next turn retries
                log.warning("nats: applying transactions failed (%s: %s)", type(exc).__name__, exc)
                await asyncio.sleep(0.2)

    async def _apply_ready(self) -> None:
        """Apply transactions along the chain (module docstring)."""
        async with self._moving:
            await self._apply_chain()
        self._forget_old_events()

    async def _apply_chain(self) -> None:
        while self._txs:
            tx = self._txs[min(self._txs)]
            if tx.max <= self.position:
                del self._txs[tx.max]
                continue
            if tx.max > self._issued and not await self._issued_up_to(tx.max):
                del self._txs[tx.max]
                self._drop("beyond_head", self._tx_subject)
                for key in [key for key in self._events if key[0] > self._issued]:
                    del self._events[key]
                continue
            if tx.prev > self.position:
                if time.monotonic() - tx.arrived < REORDER_SECONDS:
                    return  # a transaction before it may still come
                await self._fill(self.position, tx.prev)
                continue
            del self._txs[tx.max]
            await self._apply(tx)

    async def _issued_up_to(self, up_to: int) -> bool:
        """Whether the database has issued ``up_to`` (its sequence, asked now).

        A genuine transaction message is sent after its commit, so the sequence
        has passed its ``max`` by the time it arrives: only a message that no
        instance of this database sent names more. One question covers every
        transaction waiting up to the answer."""
        async with raw_connection(self._pool) as conn:
            self._issued = max(self._issued, await last_issued_id(conn))
        return up_to <= self._issued

    async def _apply(self, tx: _Tx) -> None:
        """The transaction's events of every channel carried when it is handed over.

        Which channels are carried is asked again after each log read: a stream
        that registered during the read (at the hub's position, below
        ``tx.max``) may carry a channel that was not carried before it, and
        nothing else would ever send it that channel's events of ``tx``."""
        events: list[StoredEvent] = []
        covered: set[int] = set()
        while wanted := [c for c in tx.channels if c not in covered and self._hub.carries(c)]:
            covered.update(wanted)
            missing: list[int] = []
            for channel_id in wanted:
                received = self._events.pop((tx.max, channel_id), None)
                if received is None:
                    missing.append(channel_id)
                else:
                    events += received
            if missing:
                events += await self._read_log(missing, self.position, tx.max)
        self._hand_over(sorted(events, key=lambda e: e.id), tx.max)

    async def _fill(self, after: int, until: int) -> None:
        """Everything of the carried channels in ``(after, until]``, from the log
        (called holding ``_moving``); the carried channels asked again after each
        read, as in ``_apply``."""
        events: list[StoredEvent] = []
        covered: set[int] = set()
        while wanted := [c for c in self._hub.carried_channels() if c not in covered]:
            covered.update(wanted)
            events += await self._read_log(wanted, after, until)
        self._hand_over(sorted(events, key=lambda e: e.id), until)

    async def _read_log(self, channels: list[int], after: int, until: int) -> list[StoredEvent]:
        events: list[StoredEvent] = []
        async with raw_connection(self._pool) as conn:
            while True:
                page = await read_page(conn, channels, after, until_id=until)
                for gap in page.gaps:
                    self._hub.mark_gap(gap)
                events += page.events
                if not page.more or not page.events:
                    break
                after = page.events[-1].id
        self._metrics.broker_events.labels("log").inc(len(events))
        return events

    def _hand_over(self, events: list[StoredEvent], up_to: int) -> None:
        if up_to <= self.position:
            return
        fresh = [e for e in events if e.id > self.position]
        if fresh:
            self._hub.fan_out(fresh)
        self.position = up_to
        self._hub.position = max(self._hub.position, up_to)

    def _forget_old_events(self) -> None:
        for key in [key for key in self._events if key[0] <= self.position]:
            del self._events[key]

    # -- the safety net, on the listener's turn ----------------------------------

    async def catch_up(self, conn: Any, between_pages: BetweenPages) -> None:
        """If the log's head is ahead of ``position`` on two turns running with no
        progress, the last transactions' messages were lost: read them."""
        await between_pages(conn)
        head = await last_event_id(conn)
        lagging = head > self.position and self._head_seen[0] == self.position
        if lagging and self._head_seen[1] > self.position and not self._moving.locked():
            async with self._moving:
                await self._fill(self.position, self._head_seen[1])
        self._head_seen = (self.position, head)

    # -- connection events ------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def _on_disconnected(self) -> None:
        log.warning("nats: disconnected; events will be read from the log until it is back")

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected")
        self._wake.set()


# What a sealed message that is not of the shape ssehub sends raises in the checks
# (orjson's JSONDecodeError is a ValueError).
_MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"not an id: {value!r}")
    return value


def _text(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"not a string: {value!r}")
    return value


def _transaction(payload: bytes) -> _Tx:
    """``{"max", "prev", "ch"}``, checked: ``prev < max``, channel ids."""
    data = orjson.loads(payload)
    tx = _Tx(
        _int(data["max"]),
        _int(data["prev"]),
        tuple(_int(c) for c in data["ch"]),
        time.monotonic(),
    )
    if tx.prev >= tx.max:
        raise ValueError("a transaction ends after the one before it")
    return tx


def _channel_events(payload: bytes, channel_id: int) -> tuple[int, list[StoredEvent]]:
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
