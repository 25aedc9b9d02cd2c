"""Users: create, authenticate, promote. Services never commit; the caller does.

Password hashing is slow on purpose: it never runs while a database connection
is held (``authenticate`` looks the hash up and lets the connection go first;
``create_user`` takes a finished hash), so a flood of logins cannot empty the
pool that every other request needs (``app.auth.throttle``).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.passwords import hash_password, verify_password
from app.auth.personal import insert_personal_channels
from app.auth.schemas import USERNAME_PATTERN
from app.auth.throttle import LoginThrottle
from app.db import insert_unique, raw_connection
from app.errors import Unauthorized
from app.models import User
from app.notify import notify_control

_USERNAME = re.compile(USERNAME_PATTERN)
ADMIN_LOCK = 0x55E4DAD  # pg advisory lock key: one admin bootstrap at a time
_INSERT_PERSONAL_CHANNEL = insert_personal_channels("public.users WHERE id = :user_id")


async def get_user(session: AsyncSession, user_id: int) -> User | None:
    return await session.get(User, user_id)


async def get_user_by_name(session: AsyncSession, username: str) -> User | None:
    result = await session.execute(select(User).where(User.username == username))
    return result.scalar_one_or_none()


async def create_user(
    session: AsyncSession, username: str, password_hash: str, is_admin: bool = False
) -> User:
    """Insert a user with its personal channel; a taken name is a 409 even when two
    requests race for it."""
    user = User(username=username, password_hash=password_hash, is_admin=is_admin)
    user = await insert_unique(session, user, f"Username {username!r} is taken")
    await session.execute(text(_INSERT_PERSONAL_CHANNEL), {"user_id": user.id})
    return user


async def authenticate(pool: Any, throttle: LoginThrottle, username: str, password: str) -> int:
    """The user id; the same 401 for an unknown user and a wrong password, in the same time.

    A name that could never have been registered (a NUL byte, say, which
    Postgres cannot even compare) is an unknown user, not a query. The hash is
    read on a pooled connection that is returned before argon2 runs, in the
    throttle's bounded pool; call it within a ``LoginThrottle.slot``.
    """
    row = None
    if _USERNAME.match(username):
        async with raw_connection(pool) as conn:
            row = await conn.fetchrow(
                "SELECT id, password_hash FROM public.users WHERE username = $1", username
            )
    known_hash = row[1] if row else None
    if not await throttle.run(verify_password, password, known_hash) or row is None:
        raise Unauthorized("Incorrect username or password")
    return int(row[0])


async def ensure_admin(
    session: AsyncSession, username: str, password: str, *, reset: bool = False
) -> tuple[User, bool]:
    """Create ``username`` as an admin; with ``reset``, promote an existing one and
    set its password, else leave it exactly as it is.

    Returns the user and whether it was created. ``serve`` runs this on every
    start with ``SSEHUB_ADMIN_*``, so it must not reset: that would undo a
    password changed since, and hand the account to whoever can edit the
    environment. ``create-admin`` is the deliberate reset. Instances that
    start together with the same ``SSEHUB_ADMIN_*`` would otherwise all see no
    such user and all insert it; a transaction-scoped advisory lock makes them
    take turns.
    """
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMIN_LOCK})
    user = await get_user_by_name(session, username)
    if user is None:
        password_hash = await asyncio.to_thread(hash_password, password)
        return await create_user(session, username, password_hash, is_admin=True), True
    if reset:
        user.is_admin = True
        user.password_hash = await asyncio.to_thread(hash_password, password)
        await session.flush()
        # Instances remember who may publish (app.events.rights): tell them.
        await notify_control(session, "user_changed", user_id=user.id)
    return user, False
