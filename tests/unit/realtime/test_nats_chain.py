"""The NATS chain's decisions (``app.realtime.nats_chain``), without NATS or a database."""

from __future__ import annotations

from datetime import UTC, datetime

from app.events.log import StoredEvent
from app.realtime.nats_chain import (
    REORDER_SECONDS,
    Apply,
    Chain,
    Fill,
    SafetyNet,
    Tx,
    Verify,
    fresh,
)


def _event(event_id: int, channel_id: int = 1) -> StoredEvent:
    return StoredEvent(event_id, channel_id, f"c{channel_id}", "message", "{}", datetime.now(UTC))


def _tx(top: int, prev: int, channels: tuple[int, ...] = (1,), arrived: float = 0.0) -> Tx:
    return Tx(top, prev, channels, arrived)


def test_the_next_transaction_in_the_chain_applies() -> None:
    chain = Chain(issued=10)
    tx = _tx(5, 3)
    assert chain.add_transaction(tx, position=3)
    assert chain.next_step(position=3, now=0.0) == Apply(tx)
    assert chain.next_step(position=5, now=0.0) is None  # taken


def test_transactions_apply_in_chain_order_whatever_the_arrival_order() -> None:
    chain = Chain(issued=10)
    later, first = _tx(8, 5), _tx(5, 3)
    chain.add_transaction(later, position=3)
    chain.add_transaction(first, position=3)
    assert chain.next_step(position=3, now=0.0) == Apply(first)
    assert chain.next_step(position=5, now=0.0) == Apply(later)


def test_seen_transactions_and_events_are_not_kept() -> None:
    chain = Chain(issued=10)
    assert not chain.add_transaction(_tx(5, 3), position=5)
    assert not chain.add_events(5, 1, [_event(5)], position=5)
    assert chain.next_step(position=5, now=0.0) is None


def test_a_transaction_passed_while_waiting_is_dropped() -> None:
    chain = Chain(issued=10)
    chain.add_transaction(_tx(5, 3), position=1)
    chain.add_transaction(_tx(8, 5), position=1)
    # The log filled up to 5 meanwhile: the first is stale, the second is next.
    assert chain.next_step(position=5, now=0.0) == Apply(_tx(8, 5))


def test_a_hole_waits_for_late_messages_then_is_filled_from_the_log() -> None:
    chain = Chain(issued=10)
    chain.add_transaction(_tx(8, 5, arrived=100.0), position=3)
    assert chain.next_step(position=3, now=100.0) is None
    assert chain.next_step(position=3, now=100.0 + REORDER_SECONDS / 2) is None
    assert chain.next_step(position=3, now=100.0 + REORDER_SECONDS) == Fill(3, 5)
    # Filled: the transaction is next.
    assert chain.next_step(position=5, now=100.0 + REORDER_SECONDS) == Apply(
        _tx(8, 5, arrived=100.0)
    )


def test_an_id_beyond_what_the_database_issued_is_verified_first() -> None:
    chain = Chain(issued=4)
    chain.add_transaction(_tx(8, 3), position=3)
    assert chain.next_step(position=3, now=0.0) == Verify(8)
    assert chain.issued_now(9)  # the database had issued it: genuine
    assert chain.next_step(position=3, now=0.0) == Apply(_tx(8, 3))


def test_a_transaction_the_database_never_issued_is_dropped_with_its_events() -> None:
    chain = Chain(issued=4)
    chain.add_transaction(_tx(1000, 3), position=3)
    chain.add_events(1000, 1, [_event(1000)], position=3)
    chain.add_events(4, 1, [_event(4)], position=3)
    assert chain.next_step(position=3, now=0.0) == Verify(1000)
    assert not chain.issued_now(6)
    assert chain.next_step(position=3, now=0.0) is None
    assert chain.take(_tx(1000, 3), [1]) == ([], [1])  # forgotten
    events, missing = chain.take(_tx(4, 3), [1])
    assert [e.id for e in events] == [4] and missing == []


def test_ids_this_instance_committed_need_no_question() -> None:
    chain = Chain(issued=4)
    chain.committed_here(8)
    chain.add_transaction(_tx(8, 3), position=3)
    assert chain.next_step(position=3, now=0.0) == Apply(_tx(8, 3))


def test_take_returns_received_events_and_names_the_missing_channels() -> None:
    chain = Chain(issued=10)
    tx = _tx(6, 3, channels=(1, 2, 3))
    chain.add_events(6, 1, [_event(4, 1), _event(6, 1)], position=3)
    chain.add_events(6, 3, [_event(5, 3)], position=3)
    events, missing = chain.take(tx, [1, 2])
    assert [e.id for e in events] == [4, 6] and missing == [2]
    # Taken once: asked again, channel 1's message is gone.
    assert chain.take(tx, [1, 3])[1] == [1]


def test_old_channel_messages_are_forgotten() -> None:
    chain = Chain(issued=10)
    chain.add_events(5, 1, [_event(5)], position=0)
    chain.add_events(8, 1, [_event(8)], position=0)
    chain.forget_through(5)
    assert chain.take(_tx(5, 3), [1]) == ([], [1])
    assert chain.take(_tx(8, 5), [1])[1] == []


def test_waiting_since_is_the_oldest_pending_transaction() -> None:
    chain = Chain(issued=10)
    assert chain.waiting_since() is None
    chain.add_transaction(_tx(8, 5, arrived=7.0), position=0)
    chain.add_transaction(_tx(9, 8, arrived=3.0), position=0)
    assert chain.waiting_since() == 3.0


def test_fresh_sorts_and_drops_what_was_handed_over() -> None:
    events = [_event(7), _event(3), _event(5)]
    assert [e.id for e in fresh(events, position=4, through=8) or []] == [5, 7]
    assert fresh([_event(3)], position=4, through=4) is None
    assert fresh([], position=4, through=9) == []


def test_the_safety_net_fills_after_two_looks_without_progress() -> None:
    net = SafetyNet()
    assert net.fill_until(position=10, head=12) is None  # first look: may be in flight
    net.looked(10, 12)
    assert net.fill_until(position=10, head=15) == 12  # still behind: read up to 12
    net.looked(12, 15)
    assert net.fill_until(position=15, head=15) is None  # caught up


def test_the_safety_net_waits_while_the_position_moves() -> None:
    net = SafetyNet()
    net.looked(10, 12)
    assert net.fill_until(position=11, head=14) is None
