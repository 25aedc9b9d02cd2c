"""Who may read a channel: the one definition, as SQL.

Admins read every channel; anyone reads a public one; its members read a
private one; its user reads a personal channel (``owner_id``). A channel the
caller may not read is answered exactly like a missing one (404), so private
names do not leak.

The rule is a plain SQL condition, spliced into each query that needs it
(opening a stream, re-checking streams, history, publish rights) and given to
the ORM queries as text (``readable_by``): no function call per row, so each
query keeps the plan it would have with the condition written inline.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, TextClause, bindparam, text

from app.models import Channel


def readable(channel: str, user_id: str, is_admin: str | None = None) -> str:
    """The rule as a SQL condition on the channel row ``channel`` (an alias) for
    the user whose id is the SQL expression ``user_id``; ``is_admin`` is the
    expression for its admin flag, or None where the caller is known not to be
    one (an admin needs no condition at all)."""
    admin = f"{is_admin} OR " if is_admin else ""
    # Aliases and placeholders from this package's queries, never input.
    return f"""({admin}NOT {channel}.private OR {channel}.owner_id = {user_id} OR EXISTS (
        SELECT 1 FROM public.channel_members m
        WHERE m.channel_id = {channel}.id AND m.user_id = {user_id}))"""  # noqa: S608


# Over a user ``u`` and a channel ``c``, as the hot queries name them.
READABLE = readable("c", "u.id", "u.is_admin")


def readable_by(user_id: int) -> TextClause:
    """The rule for an ORM query over ``Channel``, for a caller who is not an admin."""
    condition = readable(Channel.__tablename__, ":reader")
    return text(condition).bindparams(bindparam("reader", user_id, type_=BigInteger))
