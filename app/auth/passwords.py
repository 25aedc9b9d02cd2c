"""Password hashing with argon2 (pwdlib)."""

from __future__ import annotations

import functools

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

_hasher = PasswordHash((Argon2Hasher(),))


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so an unknown name costs the
    same time as a wrong password and the two cannot be told apart. Made on first
    use, not at import: every process (each CLI command) would pay for it."""
    return _hasher.hash("ssehub-timing-equaliser")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, password_hash: str | None) -> bool:
    return _hasher.verify(password, password_hash or _dummy_hash()) and password_hash is not None
