"""A self-signed TLS certificate for a box without a PKI (`edgeserve keys tls-self-signed`).

Clients pin the certificate itself (e.g. `httpx.Client(verify="cert.pem")`), so it is a
plain server certificate (not a CA) naming every address the box answers on.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeserve.auth.keyfiles import write_atomic, write_private
from edgeserve.errors import Conflict

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
HOSTNAME = re.compile(r"(?=.{1,253}$)(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*")


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path


def tls_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "keys" / "tls"


def create_self_signed(
    state_dir: Path,
    hostnames: Sequence[str] = (),
    *,
    days: int = 825,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> TLSFiles:
    """Write an ECDSA P-256 key (0600) and a certificate for `hostnames` plus loopback
    and this machine's name; Conflict if they exist, unless `force`."""
    folder = tls_dir(state_dir)
    files = TLSFiles(cert=folder / CERT_NAME, key=folder / KEY_NAME)
    if (files.cert.exists() or files.key.exists()) and not force:
        raise Conflict(f"a TLS certificate already exists in {folder}")
    if not 1 <= days <= 3650:
        raise ValueError("days must be between 1 and 3650")
    machine = socket.gethostname()
    own = [machine] if HOSTNAME.fullmatch(machine) else []  # an odd hostname is just left out
    names = list(dict.fromkeys([*hostnames, *own, *DEFAULT_NAMES]))
    key = ec.generate_private_key(ec.SECP256R1())
    start = (now or datetime.datetime.now(datetime.timezone.utc)) - datetime.timedelta(minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(files.key, key_pem)
    write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not HOSTNAME.fullmatch(name):
        raise ValueError(f"not a host name or IP address: {name!r}")
    return x509.DNSName(name.lower())
