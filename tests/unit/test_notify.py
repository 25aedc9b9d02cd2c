"""Control hints (``app.notify``): what a NOTIFY payload may merge, within a bound."""

from __future__ import annotations

from typing import get_args

import orjson

from app.notify import MAX_HINTS, ControlOp, Hints, control_payload


def test_control_hints_take_only_what_ssehub_sends_within_a_bound() -> None:
    """Anyone may NOTIFY: a message ssehub does not send merges nothing, and a
    flood of distinct ids turns into one re-check of everything, not a set
    that grows with the flood."""
    hints = Hints()
    for message in (
        [],
        "x",
        {"op": "subscribed"},
        {"op": "subscribed", "user_id": "1"},
        {"op": "subscribed", "user_id": True},
        {"op": "subscribed", "user_id": 1.0},
        {"op": "subscribed", "user_id": 0},
        {"op": "subscribed", "user_id": -5},
        {"op": "subscribed", "user_id": 2**63},
        {"op": "granted", "user_id": 1},
        {"op": ["subscribed"], "user_id": 1},
    ):
        assert not hints.add(message), message
    assert not hints
    assert hints.add({"op": "unsubscribed", "user_id": 7, "channel_id": 3, "channel": "x"})
    assert hints.add({"op": "channel_deleted", "channel_id": 3, "channel": "anything"})
    assert hints.add({"op": "api_key_revoked", "key_id": 2})
    assert (hints.subscribers, hints.channels, hints.api_keys) == ({7}, {3}, {2})
    assert hints.changed() and not hints.everything
    for n in range(1, MAX_HINTS + 1):
        assert hints.add({"op": "user_changed", "user_id": n})
    assert hints.everything
    assert not (hints.users or hints.subscribers or hints.channels or hints.api_keys)
    only_recheck = Hints()
    only_recheck.recheck_streams_of(4)
    assert only_recheck and not only_recheck.changed()


def test_every_op_ssehub_sends_merges_into_its_set() -> None:
    """A payload built by ``control_payload`` is one ``Hints.add`` accepts, for
    each op, and lands in the set that op names."""
    where = {
        "channel_deleted": ("channels", "channel_id"),
        "access_changed": ("channels", "channel_id"),
        "subscribed": ("subscribers", "user_id"),
        "unsubscribed": ("subscribers", "user_id"),
        "user_changed": ("users", "user_id"),
        "api_key_revoked": ("api_keys", "key_id"),
        "presence_changed": ("presence", "channel_id"),
    }
    assert set(where) == set(get_args(ControlOp)), "an op this test does not know"
    for op, (field, name) in where.items():
        hints = Hints()
        assert hints.add(orjson.loads(control_payload(op, **{name: 2**63 - 1})))  # type: ignore[arg-type]
        assert getattr(hints, field) == {2**63 - 1} and hints, op
        # Who is online is no right: access answers read meanwhile still hold.
        assert hints.changed() is (op != "presence_changed"), op


def test_once_everything_is_due_no_id_is_kept() -> None:
    hints = Hints(everything=True)
    assert hints.add({"op": "user_changed", "user_id": 5})
    hints.recheck_streams_of(5)
    assert hints.changed() and not (hints.users or hints.recheck)


def test_the_bound_counts_every_set_together() -> None:
    hints = Hints()
    for n in range(1, MAX_HINTS // 2 + 1):
        hints.add({"op": "subscribed", "user_id": n})
        hints.recheck_streams_of(n)
    assert not hints.everything
    hints.add({"op": "api_key_revoked", "key_id": 1})
    assert hints.everything and not hints.recheck
