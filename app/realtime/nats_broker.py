"""``SSEHUB_BROKER=nats``: live events over NATS, only for the channels this instance carries.

With the Postgres broker every instance reads every event from the log: with
k instances the log is read k times. Here the instance that commits a
publishing transaction sends its events over core NATS, and each instance
receives only the channels its open streams carry (it subscribes to a
channel's subject when the hub's first stream carries it: ``follow``).
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
The broker applies transactions strictly along the chain from the hub's
``position`` (every id up to it handed to the hub, for every carried channel;
the decisions are ``app.realtime.nats_chain``'s):

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
  down): every ``SAFETY_NET_SECONDS`` the log's head is compared with
  ``position``; behind on two looks running, the carried channels are read
  from the log up to the head.

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
is sealed (``app.realtime.seal``, written and checked by
``app.realtime.nats_wire``): a client without ``SSEHUB_SECRET_KEY``
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
**Health.** ``health`` is not ok while NATS is disconnected, while a
channel's subscription failed and is not in place yet, or while a
transaction has waited ``STUCK_SECONDS`` without being handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from app.db import raw_connection
from app.events.log import StoredEvent, last_event_id, last_issued_id, read_page
from app.metrics import Metrics
from app.realtime import nats_client
from app.realtime.broker import STUCK_SECONDS, Health, LogTail, Sink
from app.realtime.nats_chain import Apply, Chain, Fill, SafetyNet, Verify, fresh
from app.realtime.nats_wire import (
    MALFORMED,
    Wire,
    database_identity,
    decode_channel_events,
    decode_transaction,
    subject_namespace,
)

log = logging.getLogger("ssehub")

DROP_REASONS = ("unsealed", "replayed", "malformed", "beyond_head")
# Drops are logged at most this often per reason (a flood must not flood the log).
DROP_LOG_SECONDS = 10.0
SAFETY_NET_SECONDS = 2.0  # how often the log's head is compared with the position
RETRY_SECONDS = 0.2  # after a failed subscription or log read


class NatsBroker:
    def __init__(
        self,
        url: str,
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
        self._wire: Wire | None = None  # set in start: the namespace depends on the database
        # Past this many unprocessed messages a subscription drops the next ones
        # (nats-py's slow consumer): the chain notices, the log fills them.
        self._pending_limit = pending_limit
        self._pool = pool
        self._metrics = metrics
        self._sink: Sink | None = None
        self._nc: NatsClient | None = None
        self._subs: dict[int, Subscription] = {}
        self._follow_due: set[int] = set()  # channels whose subscription may be wrong
        self._follow_wake = asyncio.Event()
        self._follow_failed = False  # the last subscription change failed
        self._outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._chain = Chain()
        self._net = SafetyNet()
        self._wake = asyncio.Event()
        # Held while the position moves by way of an await (a log read): the
        # committer's shortcut waits its turn.
        self._moving = asyncio.Lock()
        self._drops_logged: dict[str, float] = {}
        for reason in DROP_REASONS:
            metrics.nats_dropped.labels(reason)

    async def start(self, sink: Sink) -> None:
        async with raw_connection(self._pool) as conn:
            sink.deliver([], await last_event_id(conn))
            self._chain.issued = await last_issued_id(conn)
            namespace = subject_namespace(self._key, *await database_identity(conn))
        self._wire = Wire(self._key, namespace)
        self._sink = sink
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
            self._wire.tx_subject, cb=self._on_tx, pending_msgs_limit=self._pending_limit
        )

    async def run(self) -> None:
        """Send, apply the chain, and follow channels, until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._send_forever(), name="nats-send")
            tasks.create_task(self._apply_forever(), name="nats-apply")
            tasks.create_task(self._follow_forever(), name="nats-follow")

    async def stop(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.drain(), 2)

    def log_tail(self) -> LogTail | None:
        return None  # events come over NATS; the log only fills gaps, from the pool

    def health(self) -> Health:
        if self._nc is None or not self._nc.is_connected:
            return Health(False, "not connected to NATS")
        if self._follow_failed:
            return Health(False, "subscribing to a carried channel failed")
        waiting = self._chain.waiting_since()
        if waiting is not None and time.monotonic() - waiting >= STUCK_SECONDS:
            return Health(False, "the chain of transactions has not moved")
        return Health(True, "connected to NATS")

    # -- publishing (the committer) ---------------------------------------------

    def committed(self, events: list[StoredEvent], tx_prev: int) -> None:
        """Send the transaction to every interested instance, and hand it to this
        instance's hub at once if nothing can come between (position == tx_prev)."""
        if not events or self._wire is None or self._sink is None:
            return
        self._chain.committed_here(events[-1].id)
        for message in self._wire.transaction(events, tx_prev):
            self._outbox.put_nowait(message)
        if not self._moving.locked() and self._sink.position == tx_prev:
            self._metrics.broker_events.labels("commit").inc(len(events))
            self._sink.deliver(events, events[-1].id)

    async def _send_forever(self) -> None:
        """One sender, so one connection's messages keep their order (and their
        seals' counters rise in that order)."""
        while True:
            subject, payload = await self._outbox.get()
            try:
                assert self._nc is not None and self._wire is not None
                await self._nc.publish(subject, self._wire.seal(subject, payload))
            except Exception as exc:  # the others notice the hole and read the log
                log.warning("nats: publishing %s failed (%s)", subject, exc)

    # -- following channels -----------------------------------------------------

    def follow(self, channel_id: int) -> None:
        self._follow_due.add(channel_id)
        self._follow_wake.set()

    def unfollow(self, channel_id: int) -> None:
        self._follow_due.add(channel_id)
        self._follow_wake.set()

    async def _follow_forever(self) -> None:
        """Subscribe to a channel its first stream carries; unsubscribe after its
        last. One channel at a time, each on the hub's state when its turn comes,
        so a stream that comes and goes quickly costs at most one of each."""
        while True:
            await self._follow_wake.wait()
            self._follow_wake.clear()
            while self._follow_due:
                channel_id = self._follow_due.pop()
                try:
                    await self._follow(channel_id)
                    self._follow_failed = False
                except Exception as exc:  # a message not received is read from the log
                    log.warning("nats: following channel %s failed (%s)", channel_id, exc)
                    self._follow_failed = True
                    self._follow_due.add(channel_id)
                    await asyncio.sleep(RETRY_SECONDS)

    async def _follow(self, channel_id: int) -> None:
        assert self._nc is not None and self._wire is not None and self._sink is not None
        carried = self._sink.carries(channel_id)
        if carried and channel_id not in self._subs:
            self._subs[channel_id] = await self._nc.subscribe(
                self._wire.subject(channel_id),
                cb=self._on_events,
                pending_msgs_limit=self._pending_limit,
            )
        elif not carried and channel_id in self._subs:
            await self._subs.pop(channel_id).unsubscribe()
            self._wire.forget(channel_id)

    # -- receiving --------------------------------------------------------------

    def _open(self, msg: Msg) -> bytes | None:
        """The message's payload if it is a fresh one of this deployment's, else
        None (dropped and counted)."""
        assert self._wire is not None
        opened = self._wire.open(msg.subject, msg.data)
        if isinstance(opened, str):
            self._drop(opened, msg.subject)
            return None
        return opened

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
            tx = decode_transaction(payload, time.monotonic())
        except MALFORMED:
            self._drop("malformed", msg.subject)
            return
        assert self._sink is not None
        if self._chain.add_transaction(tx, self._sink.position):
            self._wake.set()

    async def _on_events(self, msg: Msg) -> None:
        payload = self._open(msg)
        if payload is None:
            return
        try:
            channel_id = Wire.channel_of(msg.subject)
            top, events = decode_channel_events(payload, channel_id)
        except MALFORMED:
            self._drop("malformed", msg.subject)
            return
        assert self._sink is not None
        if self._chain.add_events(top, channel_id, events, self._sink.position):
            self._metrics.broker_events.labels("nats").inc(len(events))

    # -- applying the chain -----------------------------------------------------

    async def _apply_forever(self) -> None:
        looked_at = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._chain.reorder_seconds)
            self._wake.clear()
            try:
                async with self._moving:
                    await self._apply_chain()
                    if time.monotonic() - looked_at >= SAFETY_NET_SECONDS:
                        looked_at = time.monotonic()
                        await self._safety_net()
                assert self._sink is not None
                self._chain.forget_through(self._sink.position)
            except Exception as exc:  # the database away: the next turn retries
                log.warning("nats: applying transactions failed (%s: %s)", type(exc).__name__, exc)
                await asyncio.sleep(RETRY_SECONDS)

    async def _apply_chain(self) -> None:
        """Apply transactions along the chain (module docstring), holding ``_moving``."""
        assert self._sink is not None and self._wire is not None
        while step := self._chain.next_step(self._sink.position, time.monotonic()):
            if isinstance(step, Verify):
                async with raw_connection(self._pool) as conn:
                    issued = await last_issued_id(conn)
                if not self._chain.issued_now(issued):
                    self._drop("beyond_head", self._wire.tx_subject)
            elif isinstance(step, Fill):
                await self._fill(step.after, step.until)
            elif isinstance(step, Apply):
                await self._apply(step)

    async def _apply(self, step: Apply) -> None:
        """The transaction's events of every channel carried when it is handed over.

        Which channels are carried is asked again after each log read: a stream
        that registered during the read (at the hub's position, below
        ``tx.max``) may carry a channel that was not carried before it, and
        nothing else would ever send it that channel's events of ``tx``."""
        assert self._sink is not None
        tx, sink = step.tx, self._sink
        events: list[StoredEvent] = []
        covered: set[int] = set()
        while wanted := [c for c in tx.channels if c not in covered and sink.carries(c)]:
            covered.update(wanted)
            received, missing = self._chain.take(tx, wanted)
            events += received
            if missing:
                events += await self._read_log(missing, sink.position, tx.max)
        self._hand_over(events, tx.max)

    async def _fill(self, after: int, until: int) -> None:
        """Everything of the carried channels in ``(after, until]``, from the log
        (called holding ``_moving``); the carried channels asked again after each
        read, as in ``_apply``."""
        assert self._sink is not None
        events: list[StoredEvent] = []
        covered: set[int] = set()
        while wanted := [c for c in self._sink.carried_channels() if c not in covered]:
            covered.update(wanted)
            events += await self._read_log(wanted, after, until)
        self._hand_over(events, until)

    async def _read_log(self, channels: list[int], after: int, until: int) -> list[StoredEvent]:
        assert self._sink is not None
        events: list[StoredEvent] = []
        async with raw_connection(self._pool) as conn:
            while True:
                page = await read_page(conn, channels, after, until_id=until)
                for gap in page.gaps:
                    self._sink.mark_gap(gap)
                events += page.events
                if not page.more or not page.events:
                    break
                after = page.events[-1].id
        self._metrics.broker_events.labels("log").inc(len(events))
        return events

    def _hand_over(self, events: list[StoredEvent], through: int) -> None:
        assert self._sink is not None
        handed = fresh(events, self._sink.position, through)
        if handed is not None:
            self._sink.deliver(handed, through)

    async def _safety_net(self) -> None:
        """If the log's head is ahead of the position on two looks running with
        no progress, the last transactions' messages were lost: read them."""
        assert self._sink is not None
        async with raw_connection(self._pool) as conn:
            head = await last_event_id(conn)
        until = self._net.fill_until(self._sink.position, head)
        if until is not None:
            await self._fill(self._sink.position, until)
        self._net.looked(self._sink.position, head)
        self._metrics.nats_safety_net_looks.inc()

    # -- connection events ------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def _on_disconnected(self) -> None:
        log.warning("nats: disconnected; events will be read from the log until it is back")

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected")
        self._wake.set()
