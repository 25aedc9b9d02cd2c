"""``app.realtime.presence``'s view: the list and the notices always add up."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from app.realtime.presence import MAX_NOTICES, Present, View, listing

SINCE = datetime(2026, 12, 7, tzinfo=UTC)


def users(*names: str) -> dict[str, Present]:
    return {name: Present(name, 1, SINCE) for name in names}


def frames(raw: bytes) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            event, data = block.split("\n")
            out.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_snapshot_once_per_stream_then_only_differences() -> None:
    view = View("room", users("bob", "ann"))
    stream = object()
    ((kind, body),) = frames(view.snapshot(stream))
    assert kind == "ssehub.presence"
    assert [u["username"] for u in body["users"]] == ["ann", "bob"]  # type: ignore[index]
    assert view.snapshot(stream) == b""  # told already: nothing twice
    notices = frames(view.replace(users("ann", "cyd"), 2))
    assert notices == [
        ("ssehub.join", {"channel": "room", "username": "cyd"}),
        ("ssehub.leave", {"channel": "room", "username": "bob"}),
    ]
    assert view.replace(users("ann", "cyd"), 3) == b""  # the same list: nothing to tell


def test_snapshot_follows_the_list_it_holds() -> None:
    view = View("room", users("ann"))
    first = view.snapshot(object())
    view.replace(users("ann", "bob"), 2)
    second = frames(view.snapshot(object()))
    assert first != view.snapshot(object())
    assert [u["username"] for u in second[0][1]["users"]] == ["ann", "bob"]  # type: ignore[index]


def test_a_snapshot_plus_its_notices_is_the_list_now() -> None:
    view = View("room", users("ann"))
    told: set[str] = {u["username"] for u in frames(view.snapshot(object()))[0][1]["users"]}  # type: ignore[index]
    crowd = users(*(f"user{n:03}" for n in range(40)))
    steps = (users("ann", "bob"), users("bob"), crowd, users("bob", "cyd", "dee"), users())
    for step in steps:
        for kind, body in frames(view.replace(step, None)):
            if kind == "ssehub.presence":
                told = {u["username"] for u in body["users"]}  # type: ignore[union-attr]
            else:
                (told.add if kind == "ssehub.join" else told.discard)(str(body["username"]))
        assert told == set(step)


def test_listing_is_in_username_order_by_bytes() -> None:
    body = listing("room", [Present("bob", 2, SINCE), Present("Zed", 1, SINCE)])
    assert [u["username"] for u in body["users"]] == ["Zed", "bob"]
    since = "2026-12-07T00:00:00.000000Z"
    assert body["users"][1] == {"username": "bob", "streams": 2, "since": since}


def test_a_turn_tells_the_changes_or_the_list_whichever_is_shorter() -> None:
    view = View("room", users("ann"))
    view.snapshot(object())
    crowd = users("ann", *(f"user{n:03}" for n in range(MAX_NOTICES * 3)))
    joins = frames(view.replace(crowd, 2))  # many joins: still shorter than the list
    assert {kind for kind, _ in joins} == {"ssehub.join"} and len(joins) == MAX_NOTICES * 3
    ((kind, body),) = frames(view.replace(users("ann"), 3))  # a mass leave: the list
    assert kind == "ssehub.presence"
    assert body["users"] == [
        {"username": "ann", "streams": 1, "since": "2026-12-07T00:00:00.000000Z"}
    ]
    assert frames(view.replace(users("ann", "bob"), 4)) == [
        ("ssehub.join", {"channel": "room", "username": "bob"})
    ]
