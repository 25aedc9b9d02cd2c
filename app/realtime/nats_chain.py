"""The chain of transactions, as decisions: which transaction applies next, when
the log must fill a gap, what is stale. No I/O: ``app.realtime.nats_broker``
asks, does what it is told (reads the log, asks the database, hands events to
the hub) and tells the answer back; its module docstring argues why this
delivers every carried event once, in id order, with no gap.

Every decision takes ``position``: every id up to it has been handed to the
hub (``Hub.position``, which only the hub writes). Nothing here keeps a
position of its own, so the chain can never disagree with the hub about it.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.events.log import StoredEvent

REORDER_SECONDS = 0.2  # how long a transaction waits for the one before it


@dataclass(frozen=True, slots=True)
class Tx:
    """One committed transaction as ``ssehub.<ns>.tx`` names it: its last id,
    the log's head before it, the channels it wrote, and when it arrived."""

    max: int
    prev: int
    channels: tuple[int, ...]
    arrived: float


@dataclass(frozen=True, slots=True)
class Apply:
    """``tx`` is next in the chain: hand over its events of the carried channels."""

    tx: Tx


@dataclass(frozen=True, slots=True)
class Fill:
    """The chain has a hole: read the carried channels' events in ``(after, until]``."""

    after: int
    until: int


@dataclass(frozen=True, slots=True)
class Verify:
    """A transaction names an id above any the database is known to have issued:
    ask the database (``Chain.issued_now``) before going on."""

    up_to: int


Step = Apply | Fill | Verify | None


class Chain:
    """Transactions and channel messages received and not yet handed over."""

    def __init__(self, issued: int = 0, reorder_seconds: float = REORDER_SECONDS) -> None:
        # The highest id the database is known to have issued: a transaction
        # naming more is checked with the database before it is applied.
        self.issued = issued
        self.reorder_seconds = reorder_seconds
        self._txs: dict[int, Tx] = {}  # by max
        self._events: dict[tuple[int, int], list[StoredEvent]] = {}  # (tx max, channel)

    def add_transaction(self, tx: Tx, position: int) -> bool:
        """Keep ``tx`` unless it is at or below ``position`` (seen already: a
        duplicate, or this instance's own shortcut). True if kept."""
        if tx.max <= position:
            return False
        self._txs[tx.max] = tx
        return True

    def add_events(
        self, top: int, channel_id: int, events: list[StoredEvent], position: int
    ) -> bool:
        """Keep a channel's events of the transaction ending at ``top``, unless it
        is at or below ``position``. True if kept."""
        if top <= position:
            return False
        self._events[(top, channel_id)] = events
        return True

    def committed_here(self, top: int) -> None:
        """This instance's writer committed ids up to ``top``: the database issued them."""
        self.issued = max(self.issued, top)

    def next_step(self, position: int, now: float) -> Step:
        """What to do next along the chain from ``position`` (stale transactions
        are dropped on the way); None when the next one is not here yet."""
        while self._txs:
            tx = self._txs[min(self._txs)]
            if tx.max <= position:
                del self._txs[tx.max]
            elif tx.max > self.issued:
                return Verify(tx.max)
            elif tx.prev > position:
                if now - tx.arrived < self.reorder_seconds:
                    return None  # a transaction before it may still come
                return Fill(position, tx.prev)
            else:
                del self._txs[tx.max]
                return Apply(tx)
        return None

    def issued_now(self, issued: int) -> bool:
        """The database's answer to ``Verify``: the highest id it has issued.
        False if the transaction asked about names more: a message no instance
        of this database sent. It is dropped, with every channel message above
        the answer. One answer covers every transaction up to it."""
        self.issued = max(self.issued, issued)
        tx = self._txs[min(self._txs)]
        if tx.max <= self.issued:
            return True
        del self._txs[tx.max]
        for key in [key for key in self._events if key[0] > self.issued]:
            del self._events[key]
        return False

    def take(self, tx: Tx, channels: list[int]) -> tuple[list[StoredEvent], list[int]]:
        """The events received for ``tx`` on ``channels``, and the channels whose
        message is not here (lost, dropped by a slow consumer, sent before this
        instance subscribed): those the log fills."""
        events: list[StoredEvent] = []
        missing: list[int] = []
        for channel_id in channels:
            received = self._events.pop((tx.max, channel_id), None)
            if received is None:
                missing.append(channel_id)
            else:
                events += received
        return events, missing

    def forget_through(self, position: int) -> None:
        """Channel messages of transactions at or below ``position`` are no use now."""
        for key in [key for key in self._events if key[0] <= position]:
            del self._events[key]

    def waiting_since(self) -> float | None:
        """When the oldest transaction not handed over arrived (None if none):
        a chain that does not move is not delivering."""
        return min((tx.arrived for tx in self._txs.values()), default=None)


def fresh(events: list[StoredEvent], position: int, through: int) -> list[StoredEvent] | None:
    """What of ``events``, sorted by id, goes to the hub when handing over up to
    ``through``: those above ``position``; None if ``through`` is not ahead of it."""
    if through <= position:
        return None
    events.sort(key=lambda e: e.id)
    return [e for e in events if e.id > position]


class SafetyNet:
    """Nothing arrives at all (the last transactions' messages were lost, NATS is
    down): compare the log's head with ``position`` every few seconds; behind on
    two looks running with no progress, the log is read up to the head seen
    the first time."""

    def __init__(self) -> None:
        self._seen = (0, 0)  # (position, log head) at the last look

    def fill_until(self, position: int, head: int) -> int | None:
        """Where to read the log up to now, if anywhere."""
        lagging = head > position and self._seen[0] == position
        return self._seen[1] if lagging and self._seen[1] > position else None

    def looked(self, position: int, head: int) -> None:
        self._seen = (position, head)
