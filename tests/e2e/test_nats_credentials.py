"""NATS credentials and TLS, against nats-servers that require them.

Each test starts a nats-server that requires one kind of credential (a user
and password, a token, a user JWT in operator mode, TLS), and a real ssehub
instance configured for it: the instance must get ready, and what it
publishes must reach a raw client holding the same credentials (ssehub's
sealed messages on its ``tx`` subject), while a client without them is
refused. A ``tls://`` URL must never send its credentials to a server that
does not start TLS: a proxy of the test's records every byte ssehub sends.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import (
    NATS_SERVER,
    Api,
    Hubs,
    NatsServer,
    RawNatsClient,
    RecordingProxy,
    Server,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    not Path(NATS_SERVER).exists(), reason="nats-server is not installed (.ci/run installs it)"
)

ENV = {"SSEHUB_BROKER": "nats", "SSEHUB_ACCESS_LOG": "false"}
PASSWORD = "p@ss:w/rd-0xq7"  # characters a URL must percent-encode
PASSWORD_IN_URL = "p%40ss%3Aw%2Frd-0xq7"


def _publishes_over(srv: Server, client: RawNatsClient) -> None:
    """What ``srv`` publishes reaches ``client``: a sealed message on its tx subject."""
    client.subscribe("ssehub.>")
    hubs = Hubs(Api(srv.url))
    try:
        hubs.channel("news")
        hubs.publish("news", "hello")
        wait_until(lambda: bool(client.messages(".tx")), "ssehub's message over NATS")
    finally:
        hubs.api.http.close()
        client.close()


def _never_ready(srv: Server, expected: str, timeout: float = 30) -> str:
    """Start ``srv`` expecting it not to get ready: wait for ``expected`` in its
    log, then stop it; returns the log."""

    def log_so_far() -> str:
        with contextlib.suppress(FileNotFoundError):  # not yet created
            return srv.log()
        return ""

    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(srv.start, timeout + 10)
        try:
            wait_until(lambda: expected in log_so_far() or starting.done(), expected, timeout)
        finally:
            srv.stop()
        with pytest.raises(RuntimeError):
            starting.result()
    log = srv.log()
    assert expected in log, log[-2000:]
    return log


def _refused(url: str, **options: Any) -> None:
    """A client with these credentials (or none) cannot connect."""
    with pytest.raises(Exception, match=r"(?i)authorization|auth"):
        RawNatsClient(url, **options).close()


def test_nats_user_and_password_in_the_url(start_server: Callable[..., Server]) -> None:
    """``nats://user:password@``, percent-encoded as in any URL."""
    nats_server = NatsServer("--user", "ssehub", "--pass", PASSWORD).start()
    try:
        port = nats_server.port
        srv = start_server(
            **ENV, SSEHUB_NATS_URL=f"nats://ssehub:{PASSWORD_IN_URL}@127.0.0.1:{port}"
        )
        _refused(nats_server.url)
        _refused(f"nats://ssehub:wrong@127.0.0.1:{port}")
        _publishes_over(srv, RawNatsClient(nats_server.url, user="ssehub", password=PASSWORD))
    finally:
        nats_server.stop()


def test_nats_token_in_the_url(start_server: Callable[..., Server]) -> None:
    """``nats://token@``."""
    token = "s3cret-nats-token-k9"
    nats_server = NatsServer("--auth", token).start()
    try:
        srv = start_server(**ENV, SSEHUB_NATS_URL=f"nats://{token}@127.0.0.1:{nats_server.port}")
        _refused(nats_server.url)
        _publishes_over(srv, RawNatsClient(nats_server.url, token=token))
    finally:
        nats_server.stop()


def test_nats_creds_file_of_an_operator_signed_user(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """``SSEHUB_NATS_CREDS``: nats-server in operator mode (JWTs signed with
    NKeys, made here as ``nsc`` would), the user's JWT and seed in a .creds file."""
    config, creds = _operator_mode(tmp_path)
    nats_server = NatsServer("-c", str(config)).start()
    try:
        srv = start_server(**ENV, SSEHUB_NATS_URL=nats_server.url, SSEHUB_NATS_CREDS=str(creds))
        _refused(nats_server.url)
        _publishes_over(srv, RawNatsClient(nats_server.url, user_credentials=str(creds)))
    finally:
        nats_server.stop()


def test_a_missing_nats_creds_file_stops_the_start(database_url: str, tmp_path: Path) -> None:
    srv = Server(
        database_url,
        env={
            **ENV,
            "SSEHUB_NATS_URL": "nats://127.0.0.1:1",
            "SSEHUB_NATS_CREDS": str(tmp_path / "missing.creds"),
        },
    )
    with pytest.raises(RuntimeError, match="server exited early") as exited:
        srv.start()
    assert "nats_creds: Path does not point to a file" in str(exited.value)


def test_nats_over_tls_trusting_a_private_ca(
    start_server: Callable[..., Server], database_url: str, tmp_path: Path
) -> None:
    """``tls://`` with ``SSEHUB_NATS_TLS_CA_FILE``: the server's certificate is
    verified against that CA (besides the system's); without it, refused."""
    ca, cert, key = _certificates(tmp_path)
    nats_server = NatsServer("--tls", "--tlscert", str(cert), "--tlskey", str(key)).start()
    url = f"tls://127.0.0.1:{nats_server.port}"
    try:
        srv = start_server(**ENV, SSEHUB_NATS_URL=url, SSEHUB_NATS_TLS_CA_FILE=str(ca))
        trusting = ssl.create_default_context(cafile=str(ca))
        _publishes_over(srv, RawNatsClient(url, tls=trusting))
        untrusting = Server(database_url, env={**ENV, "SSEHUB_NATS_URL": url})
        _never_ready(untrusting, "CERTIFICATE_VERIFY_FAILED")
    finally:
        nats_server.stop()


def test_a_tls_url_never_sends_its_password_to_a_server_without_tls(database_url: str) -> None:
    """``tls://user:password@`` pointing at a server (or a machine in the middle)
    that does not start TLS: nothing of the credentials leaves in clear, and
    the instance says why it does not connect."""
    nats_server = NatsServer("--user", "ssehub", "--pass", PASSWORD).start()
    proxy = RecordingProxy(nats_server.port)
    try:
        url = f"tls://ssehub:{PASSWORD_IN_URL}@127.0.0.1:{proxy.port}"
        srv = Server(database_url, env={**ENV, "SSEHUB_NATS_URL": url})
        _never_ready(srv, "did not start TLS")
        assert proxy.connections > 0
        assert PASSWORD.encode() not in proxy.sent
        assert PASSWORD_IN_URL.encode() not in proxy.sent
        assert b"CONNECT" not in proxy.sent
    finally:
        proxy.close()
        nats_server.stop()


# -- operator mode: an operator, an account and a user, as nsc would make them --


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _jwt(signer: nkeys.KeyPair, subject: nkeys.KeyPair, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (``ed25519-nkey``) for ``subject``, signed by ``signer``."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": subject.public_key.decode(),
        "nats": {**nats, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


def _operator_mode(tmp_path: Path) -> tuple[Path, Path]:
    """A nats-server configuration trusting one operator, with one account
    preloaded, and a .creds file for a user of that account."""
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1}
    account_limits = {**unlimited, "imports": -1, "exports": -1, "wildcards": True, "conn": -1}
    operator_jwt = _jwt(operator, operator, "test-operator", {"type": "operator"})
    account_jwt = _jwt(
        operator, account, "ssehub", {"type": "account", "limits": {**account_limits, "leaf": -1}}
    )
    user_jwt = _jwt(account, user, "ssehub", {"type": "user", "pub": {}, "sub": {}, **unlimited})
    config = tmp_path / "operator.conf"
    config.write_text(
        f'operator: "{operator_jwt}"\n'
        "resolver: MEMORY\n"
        f'resolver_preload: {{\n  {account.public_key.decode()}: "{account_jwt}"\n}}\n'
    )
    creds = tmp_path / "ssehub.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    return config, creds


# -- TLS: a private CA and a certificate for 127.0.0.1, made here ---------------


def _certificates(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost:
    the PEM files of the CA's certificate, the server's, and the server's key."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ssehub test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server-key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths
