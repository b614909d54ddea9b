"""TLS on a real `edgeserve serve` process, both engines: HTTPS with the self-signed
certificate from `edgeserve keys tls-self-signed`, plain HTTP and TLS 1.1 and weak
ciphers refused on the TLS port, and mutual TLS with `[server] tls_client_ca`."""

from __future__ import annotations

import datetime
import socket
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeserve.auth import issuer
from edgeserve.cli.group import run
from tests.serving import MODELS, RunningServer, run_server
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

DIGIT = [
    0,
    0,
    5,
    13,
    9,
    1,
    0,
    0,
    0,
    0,
    13,
    15,
    10,
    15,
    5,
    0,
    0,
    3,
    15,
    2,
    0,
    11,
    8,
    0,
    0,
    4,
    12,
    0,
    0,
    8,
    8,
    0,
    0,
    5,
    8,
    0,
    0,
    9,
    8,
    0,
    0,
    4,
    11,
    0,
    1,
    12,
    7,
    0,
    0,
    2,
    14,
    5,
    10,
    12,
    0,
    0,
    0,
    0,
    6,
    13,
    10,
    0,
    0,
    0,
]
ENGINES = ["uvicorn", "hypercorn"]


@dataclass
class TLSServer:
    server: RunningServer
    state_dir: Path
    cert: Path
    tmp: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def token(self, *scopes: str) -> str:
        return issuer.create_token(
            self.state_dir, scopes, 300, "tls-test", "edgeserve-local", "edgeserve"
        )


def trusting(cert: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    return context


def config_text(state_dir: Path, engine: str, cert: Path, key: Path, client_ca: Path | None) -> str:
    ca = f'tls_client_ca = "{client_ca}"\n' if client_ca else ""
    return (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\nstate_dir = "{state_dir}"\n'
        f'engine = "{engine}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n{ca}'
        f'[models]\nrepository = "{MODELS}"\nload = ["digits"]\n'
    )


def wait_ready(
    server: RunningServer, url: str, verify: ssl.SSLContext, timeout_s: float = 90
) -> None:

    def ready() -> bool:
        assert server.process.poll() is None, server.log()
        try:
            return httpx.get(url + "/v2/health/ready", verify=verify, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout_s, lambda: f"the server to be ready:\n{server.log()}", interval_s=0.1)


def make_self_signed_with_cli(tmp: Path) -> tuple[Path, Path, Path]:
    state_dir = tmp / "state"
    cfg = tmp / "keys.toml"
    cfg.write_text(f'[server]\nstate_dir = "{state_dir}"\n')
    assert run(["keys", "tls-self-signed", "--config", str(cfg)]) == 0
    issuer.init_keys(state_dir)
    folder = state_dir / "keys" / "tls"
    return state_dir, folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module", params=ENGINES)
def https(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TLSServer]:
    tmp = tmp_path_factory.mktemp(f"tls-{request.param}")
    state_dir, cert, key = make_self_signed_with_cli(tmp)
    text = config_text(state_dir, request.param, cert, key, None)
    with run_server(tmp, config_text=text, wait_ready=False) as server:
        live = TLSServer(server, state_dir, cert, tmp)
        wait_ready(server, live.url, trusting(cert))
        yield live


def test_ready_and_infer_over_https_with_the_self_signed_cert(https: TLSServer) -> None:
    verify = trusting(https.cert)
    assert httpx.get(https.url + "/v2/health/ready", verify=verify, timeout=10).status_code == 200
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": DIGIT}]}
    response = httpx.post(
        https.url + "/v2/models/digits/infer",
        json=body,
        headers={"Authorization": f"Bearer {https.token('infer')}"},
        verify=verify,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["model_name"] == "digits"


def test_an_untrusted_certificate_is_refused_by_a_verifying_client(https: TLSServer) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(https.url + "/v2/health/ready", verify=ssl.create_default_context(), timeout=10)


def test_plain_http_on_the_tls_port_is_never_served(https: TLSServer) -> None:
    try:
        response = httpx.get(f"http://127.0.0.1:{https.server.port}/v2/health/ready", timeout=10)
    except httpx.TransportError:
        return  # connection closed: refused
    assert response.status_code == 400, "a plain HTTP request got a served answer"
    assert b"ready" not in response.content


def handshake(port: int, context: ssl.SSLContext) -> str:
    """The negotiated TLS version; raises ssl.SSLError (or a reset) if refused."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        version = tls.version() or ""
        tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert tls.recv(12).startswith(b"HTTP/1.1 200")
        return version


def client_context(
    cert: Path, version: ssl.TLSVersion, ciphers: str | None = None
) -> ssl.SSLContext:
    context = trusting(cert)
    with warnings.catch_warnings():
        # TLS 1.0 and 1.1 are deprecated in Python; the refusal tests offer them on purpose.
        warnings.filterwarnings("ignore", r"ssl\.TLSVersion\.TLSv1", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    return context


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_are_accepted(https: TLSServer, version: ssl.TLSVersion) -> None:
    assert handshake(
        https.server.port, client_context(https.cert, version)
    ) == version.name.replace("v1_", "v1.")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused(https: TLSServer, version: ssl.TLSVersion) -> None:
    # SECLEVEL=0 lets this client offer TLS 1.0/1.1, so the refusal is the server's.
    context = client_context(https.cert, version, "DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(https.server.port, context)


@pytest.mark.parametrize(
    "ciphers", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"]
)
def test_weak_tls_1_2_ciphers_are_refused(https: TLSServer, ciphers: str) -> None:
    """CBC suites are refused (the certificate is ECDSA, so static RSA cannot be offered
    anyway): TLS 1.2 gets ECDHE with AES-GCM or ChaCha20-Poly1305 only."""
    context = client_context(https.cert, ssl.TLSVersion.TLSv1_2, f"{ciphers}:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(https.server.port, context)


# -- mutual TLS ------------------------------------------------------------------------


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def make_ca(folder: Path, name: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_cert(folder / f"{name}.pem", cert), cert, key


def make_client(
    folder: Path, name: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _write_cert(folder / f"{name}.pem", cert), _write_key(folder / f"{name}.key", key)


@dataclass
class MutualTLS:
    live: TLSServer
    good: tuple[Path, Path]
    stranger: tuple[Path, Path]


@pytest.fixture(scope="module", params=ENGINES)
def mutual(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MutualTLS]:
    tmp = tmp_path_factory.mktemp(f"mtls-{request.param}")
    state_dir, cert, key = make_self_signed_with_cli(tmp)
    ca_path, ca, ca_key = make_ca(tmp, "clients-ca")
    good = make_client(tmp, "kiosk-1", ca, ca_key)
    _, other_ca, other_key = make_ca(tmp, "other-ca")
    stranger = make_client(tmp, "stranger", other_ca, other_key)
    text = config_text(state_dir, request.param, cert, key, ca_path)
    with run_server(tmp, config_text=text, wait_ready=False) as server:
        live = TLSServer(server, state_dir, cert, tmp)
        wait_ready(server, live.url, trusting(cert, good))
        yield MutualTLS(live, good, stranger)


def test_mutual_tls_accepts_a_client_certificate_from_the_ca(mutual: MutualTLS) -> None:
    live = mutual.live
    verify = trusting(live.cert, mutual.good)
    assert httpx.get(live.url + "/v2/health/ready", verify=verify, timeout=10).status_code == 200
    response = httpx.get(
        live.url + "/v2/models/digits",
        headers={"Authorization": f"Bearer {live.token('read')}"},
        verify=verify,
        timeout=10,
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    mutual: MutualTLS, who: str
) -> None:
    live = mutual.live
    verify = trusting(live.cert, mutual.stranger if who != "no certificate" else None)
    # TLS 1.3 reports the refusal on the first read, after the client's side of the handshake.
    with pytest.raises(httpx.TransportError):
        httpx.get(live.url + "/v2/health/ready", verify=verify, timeout=10)
    with pytest.raises(
        (ssl.SSLError, ConnectionResetError, ConnectionAbortedError, AssertionError)
    ):
        handshake(live.server.port, verify)
