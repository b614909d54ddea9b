"""The JWKS cache: which keys it trusts, when it reads its source, what it keeps on failure."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from edgeserve.auth import AuthSettings, build_authenticator
from edgeserve.auth.keyset import (
    FileSource,
    JWKSError,
    KeySet,
    URLSource,
    parse_jwks,
    valid_kid,
)
from edgeserve.auth.settings import SUPPORTED_ALGORITHMS
from edgeserve.auth.tls import create_self_signed
from edgeserve.config.loader import ConfigError
from tests.auth_support import (
    CountingServer,
    TestKey,
    counting_server,
    jwks_bytes,
    write_jwks,
)

ALL = SUPPORTED_ALGORITHMS


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def idp() -> Iterator[CountingServer]:
    with counting_server() as server:
        yield server


def url_keyset(url: str, clock: FakeClock, **overrides: float) -> KeySet:
    options = {"cooldown_s": 30.0, "max_age_s": 3600.0, **overrides}
    return KeySet(
        URLSource(url, timeout_s=2.0, max_bytes=64 * 1024),
        algorithms=ALL,
        max_keys=16,
        clock=clock,
        **options,
    )


def file_keyset(path: Path, max_keys: int = 16) -> KeySet:
    return KeySet(
        FileSource(path, max_bytes=64 * 1024),
        algorithms=ALL,
        max_keys=max_keys,
        cooldown_s=30.0,
        max_age_s=3600.0,
    )


# --- parsing -----------------------------------------------------------------------------


def test_each_supported_key_type_gets_its_own_algorithm() -> None:
    keys = parse_jwks(
        jwks_bytes(TestKey.ed25519("a"), TestKey.es256("b"), TestKey.rs256("c")), ALL, 16
    )
    assert {k: v.algorithm for k, v in keys.items()} == {"a": "EdDSA", "b": "ES256", "c": "RS256"}


def _jwk(reader: type, key: object, kid: str, **extra: str) -> dict:
    return {**reader.to_jwk(key, as_dict=True), "kid": kid, **extra}  # type: ignore[attr-defined]


UNUSABLE = [
    ("hmac secret", lambda: {"kty": "oct", "k": "c2VjcmV0", "kid": "x"}),
    ("ed448", lambda: _jwk(OKPAlgorithm, ed448.Ed448PrivateKey.generate().public_key(), "x")),
    ("p-384", lambda: _jwk(ECAlgorithm, ec.generate_private_key(ec.SECP384R1()).public_key(), "x")),
    (
        "rsa 1024",
        lambda: _jwk(RSAAlgorithm, rsa.generate_private_key(65537, 1024).public_key(), "x"),
    ),
    ("alg mismatch", lambda: {**TestKey.ed25519("x").jwk(), "alg": "RS256"}),
    ("alg HS256", lambda: {**TestKey.ed25519("x").jwk(), "alg": "HS256"}),
    ("encryption key", lambda: {**TestKey.es256("x").jwk(), "use": "enc"}),
    ("no kid", lambda: {k: v for k, v in TestKey.ed25519("x").jwk().items() if k != "kid"}),
    ("path kid", lambda: TestKey.ed25519("../../etc/passwd").jwk()),
    ("bad material", lambda: {**TestKey.ed25519("x").jwk(), "x": "!!"}),
    ("not an object", lambda: "key"),
]


@pytest.mark.parametrize("make", [m for _, m in UNUSABLE], ids=[i for i, _ in UNUSABLE])
def test_unusable_keys_are_skipped_and_the_rest_kept(make) -> None:
    good = TestKey.ed25519("good")
    keys = parse_jwks(jwks_bytes(make(), good), ALL, 16)
    assert set(keys) == {"good"}


def test_algorithms_off_the_allow_list_are_skipped() -> None:
    doc = jwks_bytes(TestKey.ed25519("a"), TestKey.rs256("b"))
    assert set(parse_jwks(doc, ["RS256"], 16)) == {"b"}


def test_private_material_in_a_jwks_is_reduced_to_the_public_key() -> None:
    key = TestKey.ed25519("p")
    jwk = {**OKPAlgorithm.to_jwk(key.private, as_dict=True), "kid": "p"}
    assert "d" in jwk
    (parsed,) = parse_jwks(jwks_bytes(jwk), ALL, 16).values()
    assert not hasattr(parsed.key, "private_bytes")


def test_duplicate_kids_keep_the_first_and_the_count_is_capped() -> None:
    first, second = TestKey.ed25519("dup"), TestKey.ed25519("dup")
    many = [TestKey.ed25519(f"k{i}") for i in range(10)]
    keys = parse_jwks(jwks_bytes(first, second, *many), ALL, 4)
    assert len(keys) == 4
    assert keys["dup"].key.public_bytes_raw() == first.private.public_key().public_bytes_raw()


@pytest.mark.parametrize("doc", [b"", b"{", b"[]", b'{"keys": {}}', b'{"nokeys": []}', b"\xff"])
def test_documents_that_are_not_a_jwks_are_errors(doc: bytes) -> None:
    with pytest.raises(JWKSError):
        parse_jwks(doc, ALL, 16)


@pytest.mark.parametrize(
    ("kid", "ok"),
    [
        ("abc", True),
        ("a.b-c_d~e+f=:1", True),
        ("", False),
        ("a/b", False),
        ("k" * 128, True),
        ("k" * 129, False),
        ("é", False),
        ("a b", False),
        ("a\n", False),
        (7, False),
        (None, False),
    ],
)
def test_kid_charset_and_length(kid: object, ok: bool) -> None:
    assert valid_kid(kid) is ok


# --- a JWKS file -------------------------------------------------------------------------


def test_file_is_read_once_until_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, TestKey.ed25519("a"))
    keys = file_keyset(path)
    for kid in ["a", "nope", "other", "a"] * 50:
        keys.get(kid)
    assert keys.fetches == 1
    write_jwks(path, TestKey.ed25519("a"), TestKey.ed25519("b"))
    assert keys.get("b") is not None
    assert keys.fetches == 2


def test_missing_file_trusts_nothing_then_picks_the_file_up_when_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    keys = file_keyset(path)
    assert keys.get("a") is None
    assert keys.get("a") is None
    assert keys.fetches == 1  # the absence is noted once, not re-checked by reading
    write_jwks(path, TestKey.ed25519("a"))
    assert keys.get("a") is not None


@pytest.mark.parametrize(
    "broken", [b'{"keys": [', b"", b'{"keys": []}', b'{"keys": [{"kty": "oct", "k": "AA"}]}']
)
def test_broken_file_keeps_the_last_good_keys(tmp_path: Path, broken: bytes) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, TestKey.ed25519("a"))
    keys = file_keyset(path)
    assert keys.get("a") is not None
    path.write_bytes(broken)  # e.g. an editor halfway through saving
    assert keys.get("a") is not None
    write_jwks(path, TestKey.ed25519("b"))
    assert keys.get("b") is not None and keys.get("a") is None


def test_oversized_file_is_refused_and_last_keys_kept(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, TestKey.ed25519("a"))
    keys = file_keyset(path)
    assert keys.get("a") is not None
    path.write_bytes(jwks_bytes(TestKey.ed25519("b")) + b" " * (64 * 1024))
    assert keys.get("b") is None and keys.get("a") is not None


def test_file_with_more_keys_than_the_cap_keeps_the_first(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, *[TestKey.ed25519(f"k{i}") for i in range(5)])
    keys = file_keyset(path, max_keys=3)
    keys.get("k0")
    assert keys.kids == {"k0", "k1", "k2"}


def test_generation_moves_only_when_the_trusted_keys_change(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    a = TestKey.ed25519("a")
    write_jwks(path, a)
    keys = file_keyset(path)
    keys.get("a")
    first = keys.generation
    write_jwks(path, a)  # a new file, the same keys: nothing verified with them is stale
    keys.get("a")
    assert keys.fetches == 2 and keys.generation == first
    write_jwks(path, a, TestKey.ed25519("b"))
    keys.get("a")
    assert keys.generation > first
    moved = keys.generation
    write_jwks(path, TestKey.ed25519("a"), TestKey.ed25519("b"))  # new material, same kids
    keys.get("a")
    assert keys.generation > moved


def test_file_is_looked_at_once_per_check_interval(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, TestKey.ed25519("a"))
    clock = FakeClock()
    keys = KeySet(
        FileSource(path, max_bytes=64 * 1024),
        algorithms=ALL,
        max_keys=16,
        cooldown_s=30.0,
        max_age_s=3600.0,
        file_check_interval_s=1.0,
        clock=clock,
    )
    assert keys.get("a") is not None
    write_jwks(path, TestKey.ed25519("b"))
    clock.advance(0.5)
    assert keys.get("b") is None and keys.get("a") is not None  # not looked at yet
    clock.advance(0.5)
    assert keys.get("b") is not None and keys.get("a") is None
    assert keys.fetches == 2


# --- a JWKS URL --------------------------------------------------------------------------


def test_unknown_kids_refetch_at_most_once_per_cooldown(idp: CountingServer) -> None:
    clock = FakeClock()
    url = idp.serve("/jwks", jwks_bytes(TestKey.ed25519("a")))
    keys = url_keyset(url, clock)
    assert keys.get("a") is not None
    for i in range(500):
        assert keys.get(f"random{i}") is None
    assert idp.hits["/jwks"] == 1

    idp.serve("/jwks", jwks_bytes(TestKey.ed25519("a"), TestKey.ed25519("b")))
    assert keys.get("b") is None  # still cooling down
    clock.advance(31)
    assert keys.get("b") is not None  # a new kid after the cooldown: one refetch
    assert idp.hits["/jwks"] == 2
    assert keys.get("a") is not None  # old and new side by side
    assert idp.hits["/jwks"] == 2


def test_known_kids_do_not_refetch_until_max_age(idp: CountingServer) -> None:
    clock = FakeClock()
    url = idp.serve("/jwks", jwks_bytes(TestKey.ed25519("a"), TestKey.ed25519("b")))
    keys = url_keyset(url, clock, max_age_s=600)
    for _ in range(100):
        clock.advance(5)
        assert keys.get("a") is not None
    assert idp.hits["/jwks"] == 1
    idp.serve("/jwks", jwks_bytes(TestKey.ed25519("b")))  # the provider retired "a"
    clock.advance(600)
    assert keys.get("a") is None
    assert keys.get("b") is not None
    assert idp.hits["/jwks"] == 2


FAILURES = [
    ("server error", 500, b"oops"),
    ("not found", 404, b""),
    ("not json", 200, b"<html>"),
    ("empty jwks", 200, b'{"keys": []}'),
    ("only hmac", 200, b'{"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}'),
    ("too large", 200, b'{"keys": []' + b" " * (64 * 1024) + b"}"),
]


@pytest.mark.parametrize(
    ("status", "body"), [(s, b) for _, s, b in FAILURES], ids=[i for i, _, _ in FAILURES]
)
def test_failed_fetch_keeps_the_last_good_keys(
    idp: CountingServer, status: int, body: bytes
) -> None:
    clock = FakeClock()
    url = idp.serve("/jwks", jwks_bytes(TestKey.ed25519("a")))
    keys = url_keyset(url, clock)
    assert keys.get("a") is not None
    idp.serve("/jwks", body, status)
    clock.advance(31)
    assert keys.get("unknown") is None  # triggers the failing refetch
    assert idp.hits["/jwks"] == 2
    assert keys.get("a") is not None
    for _ in range(50):  # a failing provider is not hammered either
        keys.get("unknown")
    assert idp.hits["/jwks"] == 2


def test_unreachable_provider_keeps_keys_and_respects_cooldown(idp: CountingServer) -> None:
    clock = FakeClock()
    keys = url_keyset(idp.serve("/jwks", jwks_bytes(TestKey.ed25519("a"))), clock)
    assert keys.get("a") is not None
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    keys.source = URLSource(f"http://127.0.0.1:{dead_port}/jwks", 1.0, 1024)
    clock.advance(31)
    assert keys.get("b") is None
    assert keys.get("a") is not None
    assert keys.fetches == 2


def test_a_provider_that_never_answers_times_out() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        keys = KeySet(
            URLSource(f"http://127.0.0.1:{port}/jwks", timeout_s=0.3, max_bytes=1024),
            algorithms=ALL,
            max_keys=4,
            cooldown_s=30,
            max_age_s=3600,
        )
        answers: list[object] = []
        asker = threading.Thread(target=lambda: answers.append(keys.get("a")), daemon=True)
        asker.start()
        asker.join(60)  # a deadline for a hang, not a speed bound: the fetch times out
        assert not asker.is_alive(), "the key lookup hung on a silent JWKS server"
        assert answers == [None]


def test_redirects_are_not_followed(idp: CountingServer) -> None:
    target = idp.serve("/elsewhere", jwks_bytes(TestKey.ed25519("a")))
    url = idp.serve("/jwks", b"", 302, {"Location": target})
    keys = url_keyset(url, FakeClock())
    assert keys.get("a") is None
    assert idp.hits["/elsewhere"] == 0


def test_first_fetch_failure_is_retried_after_the_cooldown(idp: CountingServer) -> None:
    clock = FakeClock()
    url = idp.serve("/jwks", b"down", 503)
    keys = url_keyset(url, clock)
    assert keys.get("a") is None
    assert keys.get("a") is None
    assert idp.hits["/jwks"] == 1
    idp.serve("/jwks", jwks_bytes(TestKey.ed25519("a")))
    clock.advance(31)
    assert keys.get("a") is not None


def test_concurrent_unknown_kids_share_one_fetch(idp: CountingServer) -> None:
    url = idp.serve("/jwks", jwks_bytes(TestKey.ed25519("a")))
    keys = url_keyset(url, FakeClock())
    start = threading.Barrier(16)

    def worker(i: int) -> None:
        start.wait()
        for j in range(20):
            keys.get(f"w{i}-{j}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert idp.hits["/jwks"] == 1
    assert keys.kids == {"a"}


def test_refresh_due_is_cheap_and_honest(idp: CountingServer) -> None:
    clock = FakeClock()
    keys = url_keyset(idp.serve("/jwks", jwks_bytes(TestKey.ed25519("a"))), clock)
    assert keys.refresh_due("a")
    assert idp.total_hits == 0  # asking costs nothing
    keys.refresh("a")
    assert not keys.refresh_due("a")
    assert not keys.refresh_due("zzz")  # unknown, but cooling down
    clock.advance(31)
    assert keys.refresh_due("zzz")
    assert not keys.refresh_due("a")


# --- HTTPS ---------------------------------------------------------------------------------


def test_https_jwks_is_verified_against_the_configured_ca(tmp_path: Path) -> None:
    files = create_self_signed(tmp_path)
    with counting_server((files.cert, files.key)) as idp:
        url = idp.serve("/jwks", jwks_bytes(TestKey.ed25519("a")))
        assert url.startswith("https://127.0.0.1:")
        pinned = URLSource(url, timeout_s=5, max_bytes=65536, ca_file=files.cert)
        assert parse_jwks(pinned.read(), ALL, 4).keys() == {"a"}
        untrusted = URLSource(url, timeout_s=5, max_bytes=65536)  # system CAs only
        with pytest.raises(JWKSError, match="fetch failed"):
            untrusted.read()


def test_authenticator_uses_jwks_ca_file_relative_to_state_dir(tmp_path: Path) -> None:
    files = create_self_signed(tmp_path)
    key = TestKey.ed25519("a")
    with counting_server((files.cert, files.key)) as idp:
        settings = AuthSettings(
            jwks_url=idp.serve("/jwks", jwks_bytes(key)), jwks_ca_file="keys/tls/cert.pem"
        )
        authenticator = build_authenticator(settings, tmp_path, "::1")
        assert authenticator.keyset.get("a") is not None  # type: ignore[attr-defined]
        with pytest.raises(ConfigError, match=r"auth\.jwks_ca_file"):
            build_authenticator(replace(settings, jwks_ca_file="missing.pem"), tmp_path, "::1")
