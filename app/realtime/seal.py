"""Sealed NATS messages: what NATS's other clients can neither read, forge, alter nor replay.

A NATS server is often shared, and any of its clients may subscribe to
``>`` or publish on ssehub's subjects. So everything ssehub puts on NATS is
sealed with authenticated encryption (ChaCha20-Poly1305, from
``cryptography``) under a key only the instances of one deployment hold:

    message = version (1 byte) | sender (16 bytes) | counter (8 bytes) | ciphertext and tag

**Keys.** The deployment's key is HKDF-SHA256 of ``SSEHUB_SECRET_KEY`` with
the info ``ssehub nats seal v1|<namespace>``: domain-separated from every
other use of the signing key, and different for every deployment (the
namespace names the database, ``app.realtime.nats_broker.subject_namespace``).
Each sending process draws a random 16-byte ``sender`` id when it starts
and seals under its own key, HKDF-Expand of the deployment's key with the
sender id, with its message counter as the nonce. A nonce is therefore never
used twice under one key (a counter only rises; two processes share a key
only if they draw the same 128-bit id), which is the one thing ChaCha20-Poly1305
asks of its user; random 96-bit nonces under one shared key would not keep
that for ever.

**What opening checks.** The associated data is the header and the subject:
a message opens only with the deployment's key (reading or forging needs
``SSEHUB_SECRET_KEY``), only unaltered (the tag covers ciphertext, header and
subject), and only on the subject it was sealed for (it cannot be moved to
another channel's subject, nor to another deployment's).

**Replays.** A copy of a genuine message opens, so ``ReplayGuard`` remembers,
per subject, the highest counter each sender reached: a sender seals in the
order it publishes, over one connection; NATS hands one publisher's messages
to a subscription in the order sent, and nats-py hands a subscription's
messages to its callback one at a time, in order. So a genuine message always
carries a counter above the last one seen from its sender on its subject,
and a copy never does.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

VERSION = 1
_HEADER = struct.Struct(">B16sQ")  # version, sender, counter
TAG_BYTES = 16
OVERHEAD = _HEADER.size + TAG_BYTES
# Senders whose keys are kept derived (the live instances, and recent ones).
KEPT_SENDERS = 256


class Unsealable(Exception):
    """Not a message sealed with this deployment's key for this subject."""


@dataclass(frozen=True, slots=True)
class Opened:
    sender: bytes
    counter: int
    payload: bytes


class Sealer:
    """Seals this process's messages and opens those of every instance of the deployment.

    ``seal`` must be called from one task at a time, in the order the messages
    are published (the broker's one sender does), so counters rise in that order."""

    def __init__(self, secret_key: str, namespace: str) -> None:
        info = b"ssehub nats seal v1|" + namespace.encode()
        self._key = HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(
            secret_key.encode()
        )
        self.sender = os.urandom(16)
        self._counter = 0
        self._own = self._cipher(self.sender)
        self._senders: OrderedDict[bytes, ChaCha20Poly1305] = OrderedDict()

    def _cipher(self, sender: bytes) -> ChaCha20Poly1305:
        key = HKDFExpand(algorithm=SHA256(), length=32, info=b"sender|" + sender).derive(self._key)
        return ChaCha20Poly1305(key)

    def seal(self, subject: str, payload: bytes) -> bytes:
        self._counter += 1
        header = _HEADER.pack(VERSION, self.sender, self._counter)
        return header + self._own.encrypt(_nonce(self._counter), payload, header + subject.encode())

    def open(self, subject: str, message: bytes) -> Opened:
        """The payload of ``message`` if it was sealed for ``subject`` with this
        deployment's key and not altered since; else ``Unsealable``."""
        if len(message) < OVERHEAD:
            raise Unsealable("too short")
        version, sender, counter = _HEADER.unpack_from(message)
        if version != VERSION:
            raise Unsealable("unknown version")
        header = message[: _HEADER.size]
        cipher = self._senders.get(sender)
        known = cipher is not None
        if cipher is None:
            cipher = self._cipher(sender)
        try:
            payload = cipher.decrypt(
                _nonce(counter), message[_HEADER.size :], header + subject.encode()
            )
        except InvalidTag:
            raise Unsealable("not sealed with this deployment's key for this subject") from None
        # Only a sender that proved the key is kept: forged ids evict nobody.
        if known:
            self._senders.move_to_end(sender)
        else:
            self._senders[sender] = cipher
            if len(self._senders) > KEPT_SENDERS:
                self._senders.popitem(last=False)
        return Opened(sender, counter, payload)


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "big")


class ReplayGuard:
    """Per subject, the highest counter each sender reached (module docstring).

    Bounded: at most ``senders`` senders per subject (the least recently heard
    is forgotten first), and a subject's record goes with its subscription
    (``forget``). A copy that comes after its record was forgotten is older
    than the broker's position and is ignored there (``nats_broker``)."""

    def __init__(self, senders: int = KEPT_SENDERS) -> None:
        self._senders = senders
        self._subjects: dict[str, OrderedDict[bytes, int]] = {}

    def fresh(self, subject: str, opened: Opened) -> bool:
        """Whether ``opened`` comes after everything its sender sent on ``subject``
        so far (and if so, it is the last one now)."""
        seen = self._subjects.setdefault(subject, OrderedDict())
        if opened.counter <= seen.get(opened.sender, 0):
            return False
        seen[opened.sender] = opened.counter
        seen.move_to_end(opened.sender)
        if len(seen) > self._senders:
            seen.popitem(last=False)
        return True

    def forget(self, subject: str) -> None:
        self._subjects.pop(subject, None)
