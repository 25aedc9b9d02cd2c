"""A fake identity provider: signing keys made here, tokens signed with PyJWT,
and their JWKS served by ``http.server`` in a thread on a free port, whose key
set a test can change and whose hits it can count."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.example.test/"
AUDIENCE = "ssehub-tests"
ALGORITHMS = {"rsa": "RS256", "ec": "ES256", "ed25519": "EdDSA"}
_TO_JWK = {"rsa": RSAAlgorithm.to_jwk, "ec": ECAlgorithm.to_jwk, "ed25519": OKPAlgorithm.to_jwk}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def new_key(kind: str) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64json(part: dict[str, Any]) -> str:
    return b64url(json.dumps(part).encode())


def claims(sub: str = "ext-user", **over: Any) -> dict[str, Any]:
    """Valid claims; ``jti`` makes every token new, so no test meets another's
    token in the server's cache of verified tokens. ``None`` drops a claim."""
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    return {k: v for k, v in {**base, **over}.items() if v is not None}


class Idp:
    """An identity provider: signing keys, and their JWKS served over HTTP."""

    def __init__(self, port: int = 0) -> None:
        self.keys: dict[str, tuple[str, PrivateKey]] = {}  # kid -> (kind, private key)
        self.published: list[str] = []  # kids in the JWKS
        self.extra: list[dict[str, Any]] = []  # JWKs published as they are
        self.hits = 0
        self.status = 200  # what the JWKS endpoint answers; not 200: an error page
        self.delay = 0.0  # seconds before it answers
        self.drip = 0.0  # when set, the body is sent one byte per this many seconds
        self._lock = threading.Lock()
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with idp._lock:
                    idp.hits += 1
                    status, delay, drip = idp.status, idp.delay, idp.drip
                    body = json.dumps(idp.jwks()).encode() if status == 200 else b"<h1>down</h1>"
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                sent = 0
                while drip and sent < len(body):  # until the test turns the drip off
                    self.wfile.write(body[sent : sent + 1])
                    self.wfile.flush()
                    sent += 1
                    time.sleep(drip)
                    drip = idp.drip
                self.wfile.write(body[sent:])

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            kind, key = self.keys[kid]
            jwk = _TO_JWK[kind](key.public_key(), as_dict=True)  # type: ignore[arg-type]
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": ALGORITHMS[kind]})
        return {"keys": keys + self.extra}

    def add(self, kind: str, kid: str | None = None, publish: bool = True) -> str:
        """A new key of ``kind``; published in the JWKS unless ``publish`` is false."""
        kid = kid or f"{kind}-{uuid.uuid4().hex[:8]}"
        key = new_key(kind)
        with self._lock:
            self.keys[kid] = (kind, key)
            if publish:
                self.published.append(kid)
        return kid

    def token(self, kid: str, **over: Any) -> str:
        kind, key = self.keys[kid]
        return jwt.encode(claims(**over), key, algorithm=ALGORITHMS[kind], headers={"kid": kid})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def jwks_env(url: str, **over: str) -> dict[str, str]:
    return {
        "SSEHUB_JWT_ISSUER": ISSUER,
        "SSEHUB_JWT_AUDIENCE": AUDIENCE,
        "SSEHUB_JWT_JWKS_URL": url,
        "SSEHUB_JWT_ADMIN_CLAIM": "roles",
        **over,
    }
