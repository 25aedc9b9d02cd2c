"""Control hints (``app.notify``): what a NOTIFY payload may merge, within a bound."""

from __future__ import annotations

from app.notify import MAX_HINTS, Hints


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
