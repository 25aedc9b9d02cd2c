"""Connecting to NATS as the settings say: credentials, and TLS that is really TLS.

- ``SSEHUB_NATS_URL`` may carry ``user:password@`` or ``token@`` (percent-encoded
  as in any URL; they are decoded here and sent to every server of the
  cluster, not only to the one the URL names);
- ``SSEHUB_NATS_CREDS`` names a ``.creds`` file (a user JWT and its NKey
  seed, as ``nsc`` writes them), read again at every (re)connection;
- TLS verifies the server against the system's trust store, plus
  ``SSEHUB_NATS_TLS_CA_FILE`` when set (a private CA, or a self-signed
  certificate). A ``tls://`` URL never sends its credentials in clear.

Sealing (``app.realtime.seal``) keeps what passes NATS private and authentic
whatever NATS lets in; credentials keep strangers off the server
altogether, which sealing alone cannot: a client that floods ssehub's
subjects costs every instance the work of dropping what it sends.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

from nats.aio.client import Client
from nats.errors import Error as NatsError


class TlsNotOffered(NatsError):
    """The server did not switch to TLS although the URL asks for ``tls://``."""

    def __str__(self) -> str:
        return (
            "SSEHUB_NATS_URL asks for tls://, but the NATS server did not start TLS: "
            "not sending the credentials in clear (configure TLS on the server)"
        )


class _Client(Client):
    """nats-py's client, refusing to send ``CONNECT`` unencrypted when TLS was asked for.

    nats-py upgrades a connection to TLS only when the server's ``INFO`` says
    ``tls_required``; with a ``tls://`` URL and a server (or a machine in the
    middle) that does not say so, it would send ``CONNECT``, with the user,
    password, token or signed nonce, in clear. nats.go refuses such a server,
    and so does this: ``CONNECT`` is built only on a TLS transport."""

    def __init__(self, wants_tls: bool) -> None:
        super().__init__()
        self._wants_tls = wants_tls

    def _connect_command(self) -> bytes:
        if self._wants_tls and not _encrypted(self._transport):
            raise TlsNotOffered
        command: bytes = super()._connect_command()
        return command


def _encrypted(transport: Any) -> bool:
    writer = getattr(transport, "_io_writer", None)
    return writer is not None and writer.get_extra_info("ssl_object") is not None


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system's trust store (as OpenSSL finds it), plus ``ca_file`` if set;
    certificates and host names verified."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


class UrlCredentials(NamedTuple):
    """A server URL without its user information, and that information."""

    server: str
    user: str | None = None
    password: str | None = None
    token: str | None = None


def split_credentials(url: str) -> UrlCredentials:
    """``url``'s ``user:password@`` as nats-py's ``user`` and ``password``, or its
    ``token@`` (a user name without a password) as ``token``, percent-decoded."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return UrlCredentials(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    name, has_password, password = userinfo.partition(":")
    server = urlunsplit(parts._replace(netloc=host))
    if has_password:
        return UrlCredentials(server, user=unquote(name), password=unquote(password))
    return UrlCredentials(server, token=unquote(name))


async def connect(url: str, creds: Path | None, ca_file: Path | None, **options: Any) -> Client:
    """A connected client; ``options`` go to nats-py's ``connect`` as they are."""
    server, user, password, token = split_credentials(url)
    client = _Client(wants_tls=urlsplit(server).scheme == "tls")
    await client.connect(
        server,
        tls=tls_context(ca_file),
        user=user,
        password=password,
        token=token,
        user_credentials=str(creds) if creds is not None else None,
        **options,
    )
    return client
