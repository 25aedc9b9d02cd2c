"""Every user's personal channel ``@USERNAME``: the one place that names and makes it.

It is private and owned by its user (``channels.owner_id``): made in the same
transaction as the user (``app.auth.service.create_user``, and in the same
statement for ``app.auth.external``'s users), removed with it (the foreign key
cascades). ``@`` cannot begin a channel name, so the name is never another
channel's. Here in ``app.auth``, which makes users, so that ``app.channels``
may depend on ``app.auth`` and not the other way round.
"""

from __future__ import annotations


def personal_channel(username: str) -> str:
    """The name of ``username``'s personal channel."""
    return f"@{username}"


def insert_personal_channels(users: str) -> str:
    """SQL inserting the personal channel of every row of ``users`` (a table,
    a CTE, or a table with its ``WHERE``; with ``id`` and ``username``)."""
    # ``users`` comes from this package's queries and the tests, never input.
    return f"""INSERT INTO public.channels (name, private, owner_id)
    SELECT '@' || username, true, id FROM {users}"""  # noqa: S608
