"""The local issuer and TLS commands, through click's CliRunner, checked end to end:
tokens they print are accepted by the real authenticator, files have safe modes."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import jwt
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from starlette.testclient import TestClient

from edgeserve.auth import build_authenticator, issuer
from edgeserve.auth.cli import keys, parse_ttl, token
from edgeserve.auth.keyset import parse_jwks
from edgeserve.auth.settings import SUPPORTED_ALGORITHMS
from edgeserve.config.loader import Settings, load_settings
from tests.auth_support import guarded_app


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "edgeserve.toml"
    path.write_text(
        '[server]\nstate_dir = "state"\n'
        '[auth]\nissuer = "https://box.shop.lan"\naudience = "pos"\nfailed_auth_burst = 0\n'
        # Key changes are seen at the next request, not within the shipped one second.
        "jwks_file_check_interval_s = 0\n"
    )
    return path


def run(group: click.Group, *args: str) -> Result:
    return CliRunner().invoke(group, list(args), catch_exceptions=False)


def settings_of(config: Path) -> Settings:
    return load_settings(config)


def client_for(config: Path) -> TestClient:
    settings = settings_of(config)
    authenticator = build_authenticator(settings.auth, settings.server.state_dir, "0.0.0.0")
    return TestClient(guarded_app(authenticator), raise_server_exceptions=False)


def new_token(config: Path, *args: str) -> str:
    result = run(token, "create", "--config", str(config), *args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def initialised(config: Path) -> Path:
    assert run(keys, "init", "--config", str(config)).exit_code == 0
    return config


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- keys init -----------------------------------------------------------------------------


def test_keys_init_writes_a_private_key_0600_and_a_public_jwks(config: Path) -> None:
    result = run(keys, "init", "--config", str(config))
    assert result.exit_code == 0, result.output
    folder = config.parent / "state" / "keys"
    private, public = folder / issuer.SIGNING_KEY_NAME, folder / issuer.JWKS_NAME
    assert mode(private) == 0o600
    assert mode(folder) == 0o700
    assert b"PRIVATE KEY" in private.read_bytes()
    doc = json.loads(public.read_text())
    assert "d" not in doc["keys"][0]  # the JWKS holds no private material
    (key,) = parse_jwks(public.read_bytes(), SUPPORTED_ALGORITHMS, 16).values()
    assert key.algorithm == "EdDSA"
    assert str(public) in result.output


def test_keys_init_refuses_to_overwrite_without_force(initialised: Path) -> None:
    old = new_token(initialised, "--scope", "infer")
    again = run(keys, "init", "--config", str(initialised))
    assert again.exit_code == 1
    assert "--force" in again.stderr
    client = client_for(initialised)
    assert client.get("/infer", headers=bearer(old)).status_code == 200

    assert run(keys, "init", "--config", str(initialised), "--force").exit_code == 0
    assert client.get("/infer", headers=bearer(old)).status_code == 401  # no restart needed
    assert (
        client.get("/infer", headers=bearer(new_token(initialised, "--scope", "infer"))).status_code
        == 200
    )


# --- token create --------------------------------------------------------------------------


def test_created_token_is_accepted_and_carries_rfc9068_claims(initialised: Path) -> None:
    value = new_token(
        initialised, "--scope", "infer", "--scope", "read", "--ttl", "30m", "--subject", "kiosk-1"
    )
    header = jwt.get_unverified_header(value)
    claims = jwt.decode(value, options={"verify_signature": False})
    assert header["typ"] == "at+jwt" and header["alg"] == "EdDSA"
    jwks = json.loads((initialised.parent / "state/keys/jwks.json").read_text())
    assert header["kid"] == jwks["keys"][0]["kid"]
    assert claims["iss"] == "https://box.shop.lan" and claims["aud"] == "pos"
    assert claims["sub"] == "kiosk-1" and claims["scope"] == "infer read"
    assert claims["exp"] - claims["iat"] == 1800
    assert claims["jti"] and claims["client_id"]

    client = client_for(initialised)
    assert client.get("/infer", headers=bearer(value)).json()["sub"] == "kiosk-1"
    assert client.get("/read", headers=bearer(value)).status_code == 200
    assert client.get("/admin", headers=bearer(value)).status_code == 403


def test_two_tokens_have_different_ids(initialised: Path) -> None:
    a, b = (new_token(initialised, "--scope", "read") for _ in range(2))
    decode = lambda t: jwt.decode(t, options={"verify_signature": False})  # noqa: E731
    assert decode(a)["jti"] != decode(b)["jti"]


def test_json_output(initialised: Path) -> None:
    doc = json.loads(new_token(initialised, "--scope", "metrics", "--json", "--ttl", "90"))
    assert doc["scopes"] == ["metrics"] and doc["subject"] == "edgeserve-cli"
    assert jwt.decode(doc["token"], options={"verify_signature": False})["exp"] == doc["expires_at"]


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800)]
)
def test_ttl_forms(text: str, seconds: int) -> None:
    assert parse_ttl(None, None, text) == seconds


USAGE_ERRORS = [
    ("unknown scope", ["--scope", "root"]),
    ("no scope", []),
    ("ttl in years", ["--scope", "infer", "--ttl", "1y"]),
    ("ttl zero", ["--scope", "infer", "--ttl", "0"]),
    ("ttl too long", ["--scope", "infer", "--ttl", "400d"]),
    ("ttl negative", ["--scope", "infer", "--ttl", "-5m"]),
    ("empty subject", ["--scope", "infer", "--subject", " "]),
]


@pytest.mark.parametrize("args", [a for _, a in USAGE_ERRORS], ids=[i for i, _ in USAGE_ERRORS])
def test_token_create_usage_errors_exit_2(initialised: Path, args: list[str]) -> None:
    result = CliRunner().invoke(token, ["create", "--config", str(initialised), *args])
    assert result.exit_code == 2, result.output


def test_token_create_without_keys_says_what_to_run(config: Path) -> None:
    result = run(token, "create", "--config", str(config), "--scope", "infer")
    assert result.exit_code == 1
    assert "edgeserve keys init" in result.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[auth]\nalgorithms = ["HS256"]\n')
    result = run(token, "create", "--config", str(path), "--scope", "infer")
    assert result.exit_code == 2
    assert "auth.algorithms" in result.stderr


def test_config_from_environment(initialised: Path) -> None:
    result = CliRunner(env={"EDGESERVE_CONFIG": str(initialised)}).invoke(
        token, ["create", "--scope", "read"]
    )
    assert result.exit_code == 0
    assert jwt.decode(result.stdout.strip(), options={"verify_signature": False})["aud"] == "pos"


def test_warns_when_the_server_trusts_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "idp.toml"
    path.write_text('[server]\nstate_dir = "s"\n[auth]\njwks_url = "https://idp.example/jwks"\n')
    assert run(keys, "init", "--config", str(path)).exit_code == 0
    result = run(token, "create", "--config", str(path), "--scope", "read")
    assert result.exit_code == 0
    assert "will not accept" in result.stderr
    assert "will not accept" not in result.stdout  # stdout stays just the token


def test_every_command_has_an_example_in_its_help() -> None:
    for group in (keys, token):
        for name in group.list_commands(click.Context(group)):
            assert "Example: edgeserve" in run(group, name, "--help").output, name


def test_create_token_refuses_bad_arguments(tmp_path: Path) -> None:
    issuer.init_keys(tmp_path)
    with pytest.raises(ValueError, match="unknown scope"):
        issuer.create_token(tmp_path, ["infer", "superuser"], 60, "a", "i", "a")
    with pytest.raises(ValueError, match="at least one scope"):
        issuer.create_token(tmp_path, [], 60, "a", "i", "a")
    with pytest.raises(ValueError, match="ttl"):
        issuer.create_token(tmp_path, ["infer"], 0, "a", "i", "a")
    with pytest.raises(ValueError, match="subject"):
        issuer.create_token(tmp_path, ["infer"], 60, "", "i", "a")


# --- rotation ------------------------------------------------------------------------------


def test_rotation_keeps_old_tokens_valid_until_the_old_key_is_dropped(initialised: Path) -> None:
    client = client_for(initialised)
    old = new_token(initialised, "--scope", "infer")
    result = run(keys, "rotate-signing-key", "--config", str(initialised))
    assert result.exit_code == 0, result.output
    new = new_token(initialised, "--scope", "infer")
    assert jwt.get_unverified_header(new)["kid"] != jwt.get_unverified_header(old)["kid"]
    assert jwt.get_unverified_header(new)["kid"] in result.output
    assert client.get("/infer", headers=bearer(old)).status_code == 200
    assert client.get("/infer", headers=bearer(new)).status_code == 200

    assert (
        run(
            keys, "rotate-signing-key", "--config", str(initialised), "--keep-previous", "0"
        ).exit_code
        == 0
    )
    newest = new_token(initialised, "--scope", "infer")
    assert client.get("/infer", headers=bearer(old)).status_code == 401
    assert client.get("/infer", headers=bearer(new)).status_code == 401
    assert client.get("/infer", headers=bearer(newest)).status_code == 200
    assert mode(initialised.parent / "state/keys" / issuer.SIGNING_KEY_NAME) == 0o600


def test_rotation_keeps_at_most_the_requested_number_of_old_keys(tmp_path: Path) -> None:
    issuer.init_keys(tmp_path)
    for _ in range(5):
        issuer.rotate_signing_key(tmp_path, keep_previous=2)
    doc = json.loads((tmp_path / "keys" / issuer.JWKS_NAME).read_text())
    assert len(doc["keys"]) == 3


def test_rotation_without_keys_fails_cleanly(config: Path) -> None:
    result = run(keys, "rotate-signing-key", "--config", str(config))
    assert result.exit_code == 1
    assert "keys init" in result.stderr


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def tls_files(config: Path) -> tuple[Path, Path]:
    result = run(
        keys,
        "tls-self-signed",
        "--config",
        str(config),
        "--hostname",
        "box.shop.lan",
        "--hostname",
        "192.168.1.20",
    )
    assert result.exit_code == 0, result.output
    folder = config.parent / "state" / "keys" / "tls"
    return folder / "cert.pem", folder / "key.pem"


def test_tls_self_signed_writes_a_certificate_and_a_0600_key(tls_files: tuple[Path, Path]) -> None:
    cert_path, key_path = tls_files
    assert mode(key_path) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    addresses = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert {"box.shop.lan", "localhost"} <= names
    assert {"192.168.1.20", "127.0.0.1", "::1"} <= addresses
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A real TLS 1.2+ listener on loopback with the generated certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            try:
                conn, _ = listener.accept()
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        listener.close()
        thread.join(timeout=5)


@pytest.mark.parametrize("server_name", ["localhost", "box.shop.lan"])
def test_clients_pinning_the_certificate_complete_a_handshake(
    tls_files: tuple[Path, Path], server_name: str
) -> None:
    cert, key = tls_files
    client_context = ssl.create_default_context(cafile=str(cert))
    with tls_server(cert, key) as port:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with client_context.wrap_socket(raw, server_hostname=server_name) as tls:
            assert tls.recv(5) == b"hello"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with raw, pytest.raises(ssl.SSLCertVerificationError):  # a name not in the cert
            client_context.wrap_socket(raw, server_hostname="evil.example")


def test_tls_self_signed_refuses_to_overwrite_and_bad_names(
    config: Path, tls_files: tuple[Path, Path]
) -> None:
    again = run(keys, "tls-self-signed", "--config", str(config))
    assert again.exit_code == 1 and "--force" in again.stderr
    bad = CliRunner().invoke(
        keys, ["tls-self-signed", "--config", str(config), "--force", "--hostname", "a b/c"]
    )
    assert bad.exit_code == 2
    assert run(keys, "tls-self-signed", "--config", str(config), "--force").exit_code == 0
