"""Helpers shared by the auth tests (this module holds no tests): real keys, hand-made
tokens (so that broken claims like `"exp": 1e400` can be signed as-is), a Starlette app
guarded by `requires()`, and a real HTTP server on loopback that counts requests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeserve.auth.guard import requires
from edgeserve.auth.principal import ALL_SCOPES
from edgeserve.http.errors import EXCEPTION_HANDLERS

ISSUER = "edgeserve-local"
AUDIENCE = "edgeserve"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TestKey:
    """A private key, its kid and the algorithm it signs with."""

    __test__ = False  # not a test class, despite the name

    kid: str
    alg: str
    private: Any

    @classmethod
    def ed25519(cls, kid: str) -> TestKey:
        return cls(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def es256(cls, kid: str) -> TestKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def rs256(cls, kid: str) -> TestKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def jwk(self) -> dict[str, Any]:
        reader = {"EdDSA": OKPAlgorithm, "ES256": ECAlgorithm, "RS256": RSAAlgorithm}[self.alg]
        jwk = reader.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign_input(self, signing_input: bytes) -> bytes:
        reader = {"EdDSA": OKPAlgorithm, "ES256": ECAlgorithm, "RS256": RSAAlgorithm}[self.alg]
        algorithm = reader(reader.SHA256) if self.alg != "EdDSA" else reader()
        return algorithm.sign(signing_input, self.private)


def jwks_bytes(*keys: TestKey | dict) -> bytes:
    return json.dumps({"keys": [k.jwk() if isinstance(k, TestKey) else k for k in keys]}).encode()


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid access-token claims for the test config; `None` removes a claim."""
    now = int(time.time())
    doc: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "scope": "infer read",
        "jti": "t1",
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


def make_token(
    key: TestKey,
    payload: dict[str, Any] | bytes | None = None,
    *,
    header: dict[str, Any] | None = None,
    raw_header: bytes | None = None,
) -> str:
    """A compact JWS signed with `key`; header/payload may be raw bytes or overrides.

    Header values of None remove that member (e.g. {"kid": None}).
    """
    if raw_header is None:
        head: dict[str, Any] = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}
        head.update(header or {})
        raw_header = json.dumps({k: v for k, v in head.items() if v is not None}).encode()
    if payload is None:
        payload = claims()
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64url(raw_header)}.{b64url(body)}".encode()
    return f"{signing_input.decode()}.{b64url(key.sign_input(signing_input))}"


def hmac_token(secret: bytes, kid: str, payload: dict[str, Any] | None = None) -> str:
    """The classic algorithm-confusion attack: HS256 keyed with the *public* key."""
    head = json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode()
    body = json.dumps(payload or claims()).encode()
    signing_input = f"{b64url(head)}.{b64url(body)}".encode()
    mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode()}.{b64url(mac)}"


def unsigned_token(payload: dict[str, Any] | None = None, kid: str = "k1") -> str:
    head = json.dumps({"alg": "none", "typ": "at+jwt", "kid": kid}).encode()
    return f"{b64url(head)}.{b64url(json.dumps(payload or claims()).encode())}."


def guarded_app(authenticator: Any) -> Starlette:
    """A dummy app whose routes each need one scope, with the real error mapping."""

    async def echo(request: Request) -> Response:
        principal = request.state.principal
        return JSONResponse({"sub": principal.subject, "scopes": sorted(principal.scopes)})

    routes = [
        Route(f"/{scope}", requires(scope)(echo), name=scope, methods=["GET", "POST"])
        for scope in sorted(ALL_SCOPES)
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
    app.state.authenticator = authenticator
    return app


class CountingServer:
    """A real HTTP server on a free loopback port that serves set bodies and counts hits."""

    def __init__(self, tls_files: tuple[Path, Path] | None = None) -> None:
        self.bodies: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer._lock:
                    outer.hits[self.path] += 1
                    status, body, headers = outer.bodies.get(self.path, (404, b"{}", {}))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.scheme = "http"
        if tls_files is not None:  # HTTPS with the given certificate and key
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls_files)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def serve(
        self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None
    ) -> str:
        with self._lock:
            self.bodies[path] = (status, body, headers or {})
        return self.url(path)

    @property
    def total_hits(self) -> int:
        with self._lock:
            return sum(self.hits.values())


@contextmanager
def counting_server(tls_files: tuple[Path, Path] | None = None) -> Iterator[CountingServer]:
    server = CountingServer(tls_files)
    thread = threading.Thread(target=server.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=5)


def write_jwks(path: Path, *keys: TestKey | dict) -> None:
    """Replace a JWKS file the way an operator should: write aside, then rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(jwks_bytes(*keys))
    tmp.replace(path)
