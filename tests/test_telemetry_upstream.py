"""The upstream client's policy, one decision at a time: which answers advance the
cursor, how long it waits, when the circuit opens, and mutual TLS against a real
HTTPS receiver."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeserve.config.schema import parse_section
from edgeserve.telemetry.records import InferenceRecord
from edgeserve.telemetry.settings import TelemetrySettings, UpstreamSettings
from edgeserve.telemetry.store import TelemetryStore
from edgeserve.telemetry.sync import UpstreamSync, _retry_after

URL = "http://127.0.0.1:4318/v1/logs"


def _upstream(**extra: object) -> UpstreamSettings:
    doc = {
        "url": URL,
        "allowed_hosts": ["127.0.0.1"],
        "backoff_initial_s": 1.0,
        "backoff_max_s": 60.0,
        "breaker_failures": 3,
        "breaker_open_s": 120.0,
        **extra,
    }
    return parse_section(TelemetrySettings, {"upstream": doc}, "telemetry").upstream


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    store = TelemetryStore(tmp_path / "telemetry.db", "ae", 1000, 100, 0.005)
    store.start()
    for i in range(5):
        store.add(InferenceRecord(f"r{i}", "m", "1", 200, 0.01, 0, 0, 1, time.time()))
    assert store.flush(10)
    yield store
    store.stop()


def _attempts(
    store: TelemetryStore, settings: UpstreamSettings, answers: list[httpx.Response]
) -> tuple[list[float], UpstreamSync, list[httpx.Request]]:
    """Send the unsynced rows once per answer; the delay chosen after each."""
    seen: list[httpx.Request] = []
    replies = iter(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(replies)

    sync = UpstreamSync(store, settings, "test")

    async def run() -> list[float]:
        delays = []
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(handler), follow_redirects=False
        ) as client:
            for _ in answers:
                rows = await sync._take(100)
                delays.append(await sync._send(client, rows) if rows else -1.0)
        return delays

    delays = asyncio.run(run())
    return delays, sync, seen


def _unsynced(store: TelemetryStore) -> int:
    return store.submit(
        lambda c: c.execute("SELECT count(*) FROM inferences WHERE synced = 0").fetchone()[0]
    ).result()


@pytest.mark.parametrize(
    ("answer", "advances"),
    [
        (httpx.Response(200), True),
        (httpx.Response(204), True),
        (httpx.Response(500), False),
        (httpx.Response(503, headers={"Retry-After": "7"}), False),
        (httpx.Response(429, headers={"Retry-After": "7"}), False),
        (httpx.Response(307, headers={"Location": "https://elsewhere.example/v1/logs"}), False),
        (httpx.Response(308, headers={"Location": URL}), False),  # even back to itself
        (httpx.Response(401), False),
    ],
)
def test_only_a_2xx_advances_the_cursor(
    store: TelemetryStore, answer: httpx.Response, advances: bool
) -> None:
    _, sync, seen = _attempts(store, _upstream(), [answer])
    assert len(seen) == 1
    assert _unsynced(store) == (0 if advances else 5)
    assert sync.sent_records == (5 if advances else 0)


@pytest.mark.parametrize("status", [307, 308])  # the redirects that keep the POST
def test_the_sync_client_does_not_follow_a_redirect(store: TelemetryStore, status: int) -> None:
    """Through the product's own client (`_client`), against a real receiver on loopback
    that redirects /v1/logs to /elsewhere: /elsewhere is never asked, nothing advances."""
    hits: list[str] = []

    class Redirecting(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status if self.path == "/v1/logs" else 200)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sync = UpstreamSync(store, _upstream(url=f"http://127.0.0.1:{server.server_port}/v1/logs"), "t")

    async def send_once() -> None:
        async with sync._client() as client:
            await sync._send(client, await sync._take(100))

    try:
        asyncio.run(send_once())
    finally:
        server.shutdown()
        server.server_close()
    assert hits == ["/v1/logs"]
    assert _unsynced(store) == 5


def test_backoff_grows_with_full_jitter_then_the_circuit_opens(store: TelemetryStore) -> None:
    delays, sync, _ = _attempts(store, _upstream(), [httpx.Response(500)] * 4)
    assert 0 <= delays[0] <= 1.0 and 0 <= delays[1] <= 2.0  # uniform(0, initial * 2^n)
    assert delays[2] == delays[3] == 120.0  # breaker_failures = 3: open for breaker_open_s
    assert sync.failures == 4


def test_retry_after_is_honoured_up_to_its_ceiling(store: TelemetryStore) -> None:
    answers = [
        httpx.Response(429, headers={"Retry-After": "30"}),
        httpx.Response(429, headers={"Retry-After": "600"}),  # beyond backoff_max_s (60)
        httpx.Response(429, headers={"Retry-After": "86400"}),
    ]
    delays, _, _ = _attempts(store, _upstream(retry_after_max_s=3600.0), answers)
    assert delays[0] >= 30
    assert delays[1] == 600.0
    assert delays[2] == 3600.0  # capped by retry_after_max_s


def test_success_closes_the_circuit(store: TelemetryStore) -> None:
    answers = [httpx.Response(500)] * 3 + [httpx.Response(200)]
    delays, sync, seen = _attempts(store, _upstream(), answers)
    assert delays[-1] == sync.pace_s(5, len(seen[-1].content)) and sync.failures == 0


def test_each_upload_is_followed_by_the_pause_its_records_and_bytes_take(
    store: TelemetryStore,
) -> None:
    by_records = _upstream(catch_up_records_per_s=2.0)
    delays, _, _ = _attempts(store, by_records, [httpx.Response(200)])
    assert delays == [2.5]  # 5 records at 2 a second
    store.submit(lambda c: c.execute("UPDATE inferences SET synced = 0")).result()
    by_bytes = _upstream(catch_up_bytes_per_s=1024.0)
    delays, _, seen = _attempts(store, by_bytes, [httpx.Response(200)])
    assert delays == [len(seen[0].content) / 1024.0]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("5", 5.0),
        (None, None),
        ("soon", None),
        ("²", None),  # a hostile collector: str.isdigit() says yes, float() raises
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_accepts_seconds_or_a_date(header: str | None, expected: float | None) -> None:
    assert _retry_after(header) == expected


# -- mutual TLS against a real HTTPS receiver ------------------------------------------


def _cert(
    subject: str, issuer_key: ec.EllipticCurvePrivateKey | None, issuer: x509.Name | None, **kw
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if kw.get("ca"):
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    if kw.get("ip"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(kw["ip"]))]), False
        )
    if kw.get("usage"):
        builder = builder.add_extension(x509.ExtendedKeyUsage([kw["usage"]]), False)
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[str, Path, Callable[[], list[dict]]]]:
    """An HTTPS receiver that requires a client certificate from our CA."""
    ca_key, ca = _cert("test ca", None, None, ca=True)
    _write(tmp_path / "ca", ca_key, ca)
    server_key, server_cert = _cert(
        "collector", ca_key, ca.subject, ip="127.0.0.1", usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    _write(tmp_path / "server", server_key, server_cert)
    client_key, client_cert = _cert(
        "edge-box-1", ca_key, ca.subject, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    _write(tmp_path / "client", client_key, client_cert)
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            peer = self.connection.getpeercert()  # type: ignore[attr-defined]
            received.append({"peer": dict(x[0] for x in peer["subject"]), "body": body})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    context.load_verify_locations(tmp_path / "ca.crt")
    context.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/v1/logs", tmp_path, lambda: received
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("with_client_cert", [True, False])
def test_mutual_tls_to_the_collector(
    store: TelemetryStore,
    tls_receiver: tuple[str, Path, Callable[[], list[dict]]],
    with_client_cert: bool,
) -> None:
    url, certs, received = tls_receiver
    extra: dict[str, object] = {"url": url, "ca_file": str(certs / "ca.crt")}
    if with_client_cert:
        extra |= {"client_cert": str(certs / "client.crt"), "client_key": str(certs / "client.key")}
    sync = UpstreamSync(store, _upstream(**extra), "test")

    async def once() -> float:
        async with sync._client() as client:
            rows = await sync._take(100)
            return await sync._send(client, rows)

    delay = asyncio.run(once())
    if with_client_cert:
        (upload,) = received()
        assert delay == sync.pace_s(5, len(upload["body"])) and _unsynced(store) == 0
        assert upload["peer"]["commonName"] == "edge-box-1"
        logs = json.loads(gzip.decompress(upload["body"]))  # gzip by default
        assert len(logs["resourceLogs"][0]["scopeLogs"][0]["logRecords"]) == 5
    else:  # the handshake fails: nothing sent, nothing advanced
        assert delay > 0 and _unsynced(store) == 5 and received() == []
