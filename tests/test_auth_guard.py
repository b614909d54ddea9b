"""Scopes per route, auth switched off only on loopback, the failed-auth rate limit,
metrics opened on loopback, and the [auth] settings that refuse unsafe values."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from starlette.testclient import TestClient

from edgeserve.auth import (
    ALL_SCOPES,
    Authenticator,
    AuthSettings,
    JWTAuthenticator,
    OpenAuthenticator,
    Principal,
    TokenBucketLimiter,
    build_authenticator,
    check_auth_allowed,
    requires,
)
from edgeserve.auth.keyset import KeySet
from edgeserve.config.loader import ConfigError, load_settings
from edgeserve.errors import Forbidden, Overloaded
from tests.auth_support import (
    TestKey,
    claims,
    guarded_app,
    jwks_bytes,
    make_token,
    write_jwks,
)

ROOT = Path(__file__).resolve().parent.parent
LAN_CLIENT = ("198.51.100.7", 40000)
LOOPBACK_CLIENT = ("127.0.0.1", 40000)


@pytest.fixture
def key(tmp_path: Path) -> TestKey:
    key = TestKey.ed25519("k1")
    (tmp_path / "keys").mkdir()
    write_jwks(tmp_path / "keys" / "jwks.json", key)
    return key


def client_for(settings: AuthSettings, state_dir: Path, client=LAN_CLIENT) -> TestClient:
    app = guarded_app(build_authenticator(settings, state_dir, "0.0.0.0"))
    return TestClient(app, client=client, raise_server_exceptions=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- Principal and requires() ------------------------------------------------------------


def test_require_raises_insufficient_scope_with_the_challenge() -> None:
    principal = Principal("bob", frozenset({"read"}), MappingProxyType({}))
    principal.require("read")
    with pytest.raises(Forbidden) as raised:
        principal.require("admin")
    assert raised.value.status == 403
    assert raised.value.headers == {
        "WWW-Authenticate": 'Bearer error="insufficient_scope", scope="admin"'
    }


def test_every_scope_is_documented_for_operators() -> None:
    """A scope a route can require is one an operator can find in the README's list."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    paragraph = readme[readme.index("\nScopes: ") :].split("\n\n", 1)[0]
    documented = set(re.findall(r"`(\w+)`\s+\(", paragraph))  # `name` (what it allows)
    assert documented >= ALL_SCOPES, sorted(ALL_SCOPES - documented)


def test_requires_refuses_an_unknown_scope_at_import_time() -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        requires("adminn")


def test_guarded_endpoint_declares_its_scope() -> None:
    async def endpoint(request):  # pragma: no cover - never called
        raise AssertionError

    assert requires("admin")(endpoint).required_scope == "admin"  # type: ignore[attr-defined]


def test_requires_works_with_any_authenticator_that_has_authenticate() -> None:
    class Fixed:
        def authenticate(self, request) -> Principal:
            return Principal("svc", frozenset({"read"}), MappingProxyType({}))

    client = TestClient(guarded_app(Fixed()), raise_server_exceptions=False)
    assert client.get("/read").json() == {"sub": "svc", "scopes": ["read"]}
    assert client.get("/admin").status_code == 403


def test_jwt_and_open_authenticators_satisfy_the_protocol(key: TestKey, tmp_path: Path) -> None:
    assert isinstance(OpenAuthenticator(), Authenticator)
    assert isinstance(build_authenticator(AuthSettings(), tmp_path, "::1"), Authenticator)


# --- auth off: loopback only ---------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "", "box.lan"])
def test_auth_cannot_be_disabled_beyond_loopback(host: str) -> None:
    with pytest.raises(ConfigError, match=r"auth\.enabled: .*loopback"):
        check_auth_allowed(False, host)
    with pytest.raises(ConfigError):
        build_authenticator(AuthSettings(enabled=False), Path("/nonexistent"), host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_auth_disabled_on_loopback_warns_and_opens_everything(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="edgeserve.auth.authenticator"):
        authenticator = build_authenticator(AuthSettings(enabled=False), Path("/x"), host)
    assert isinstance(authenticator, OpenAuthenticator)
    assert "auth disabled" in caplog.text
    client = TestClient(guarded_app(authenticator))
    for scope in sorted(ALL_SCOPES):
        assert client.get(f"/{scope}").status_code == 200


def test_auth_enabled_is_allowed_anywhere(tmp_path: Path) -> None:
    check_auth_allowed(True, "0.0.0.0")
    assert isinstance(build_authenticator(AuthSettings(), tmp_path, "0.0.0.0"), JWTAuthenticator)


def test_jwks_file_setting_is_resolved_under_state_dir(tmp_path: Path) -> None:
    relative = build_authenticator(AuthSettings(jwks_file="trust/idp.json"), tmp_path, "::1")
    absolute = build_authenticator(AuthSettings(jwks_file="/etc/idp.json"), tmp_path, "::1")
    default = build_authenticator(AuthSettings(), tmp_path, "::1")
    paths = [a.keyset.source.path for a in (relative, absolute, default)]  # type: ignore[union-attr]
    assert paths == [
        tmp_path / "trust/idp.json",
        Path("/etc/idp.json"),
        tmp_path / "keys/jwks.json",
    ]


def test_missing_jwks_file_starts_but_refuses_every_token(tmp_path: Path) -> None:
    client = client_for(AuthSettings(), tmp_path)
    response = client.get("/infer", headers=bearer(make_token(TestKey.ed25519("k1"))))
    assert response.status_code == 401


# --- the failed-authentication rate limit --------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_limiter_allows_a_burst_then_refuses_with_retry_after() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=0.5, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("a")
        limiter.spend("a")
    with pytest.raises(Overloaded) as raised:
        limiter.check("a")
    assert raised.value.status == 429
    assert raised.value.headers == {"Retry-After": "2"}
    limiter.check("b")  # other addresses are not affected
    clock.now += 2.0
    limiter.check("a")  # one failure's worth refilled


def test_limiter_refills_to_the_burst_and_no_further() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=1.0, burst=2, clock=clock)
    limiter.spend("a")
    clock.now += 1000
    limiter.spend("a")
    limiter.spend("a")
    with pytest.raises(Overloaded):
        limiter.check("a")


def test_limiter_forgets_the_oldest_address_past_its_capacity() -> None:
    limiter = TokenBucketLimiter(rate_per_s=0.001, burst=1, max_keys=100, clock=FakeClock())
    for i in range(1000):
        limiter.spend(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._buckets) == 100
    limiter.check("10.0.0.0")  # evicted, so allowed again
    with pytest.raises(Overloaded):
        limiter.check("10.0.3.231")  # the most recent one is still remembered


def test_burst_zero_turns_the_limiter_off() -> None:
    limiter = TokenBucketLimiter(rate_per_s=1.0, burst=0)
    for _ in range(100):
        limiter.spend("a")
        limiter.take("a")
    limiter.check("a")


def test_take_refuses_when_empty_and_remembers_it() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=1.0, burst=2, what="widgets", clock=clock)
    limiter.take("s")
    limiter.take("s")
    for _ in range(3):  # refusals do not reset the bucket
        with pytest.raises(Overloaded, match="too many widgets") as raised:
            limiter.take("s")
    assert raised.value.headers == {"Retry-After": "1"}
    clock.now += 1.0
    limiter.take("s")
    with pytest.raises(Overloaded):
        limiter.take("s")


def test_limiter_is_exact_under_concurrency() -> None:
    limiter = TokenBucketLimiter(rate_per_s=0.001, burst=500, clock=FakeClock())
    granted: list[int] = []

    def worker() -> None:
        for _ in range(100):
            try:
                limiter.take("s")
                granted.append(1)
            except Overloaded:
                pass

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 500


def test_requests_per_subject_are_limited(key: TestKey, tmp_path: Path) -> None:
    client = client_for(AuthSettings(subject_burst=3, subject_rate_per_s=0.01), tmp_path)
    alice = bearer(make_token(key, claims(sub="alice")))
    bob = bearer(make_token(key, claims(sub="bob")))
    statuses = [client.get("/infer", headers=alice).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    limited = client.get("/infer", headers=alice)
    assert "retry-after" in limited.headers and "token" not in limited.headers["retry-after"]
    assert client.get("/infer", headers=bob).status_code == 200  # others are not affected


def test_subjects_are_not_limited_by_default(key: TestKey, tmp_path: Path) -> None:
    client = client_for(AuthSettings(), tmp_path)
    alice = bearer(make_token(key))
    assert {client.get("/infer", headers=alice).status_code for _ in range(300)} == {200}


def test_failed_authentications_from_one_address_get_429(key: TestKey, tmp_path: Path) -> None:
    settings = AuthSettings(failed_auth_burst=5, failed_auth_rate_per_s=0.01)
    client = client_for(settings, tmp_path)
    statuses = [client.get("/infer", headers=bearer("x.y.z")).status_code for _ in range(8)]
    assert statuses == [401] * 5 + [429] * 3
    blocked = client.get("/infer", headers=bearer("x.y.z"))
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) >= 1
    assert "error" in blocked.json()
    # A valid token from the same address is never refused by the failure limiter.
    assert client.get("/infer", headers=bearer(make_token(key))).status_code == 200
    other = TestClient(client.app, client=("198.51.100.8", 1))
    assert other.get("/infer", headers=bearer("x.y.z")).status_code == 401


def test_missing_scope_does_not_count_as_a_failed_authentication(
    key: TestKey, tmp_path: Path
) -> None:
    client = client_for(AuthSettings(failed_auth_burst=2), tmp_path)
    token = make_token(key, claims(scope="read"))
    assert {client.get("/admin", headers=bearer(token)).status_code for _ in range(10)} == {403}


# --- metrics on loopback -------------------------------------------------------------------


def test_metrics_can_be_opened_to_loopback_clients_only(key: TestKey, tmp_path: Path) -> None:
    settings = AuthSettings(metrics_open_on_loopback=True)
    local = client_for(settings, tmp_path, LOOPBACK_CLIENT)
    assert local.get("/metrics").status_code == 200
    refused = local.get("/infer")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    read_only = bearer(make_token(key, claims(scope="read")))
    assert local.get("/metrics", headers=read_only).status_code == 403  # a token is judged
    assert client_for(settings, tmp_path, LAN_CLIENT).get("/metrics").status_code == 401


def test_metrics_stay_closed_on_loopback_by_default(tmp_path: Path) -> None:
    assert client_for(AuthSettings(), tmp_path, LOOPBACK_CLIENT).get("/metrics").status_code == 401


# --- remote JWKS fetched off the event loop ------------------------------------------------


class RecordingSource:
    """A remote-looking JWKS source that notes which thread read it."""

    remote = True

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.reader_threads: list[int] = []

    def version(self) -> object:
        return None

    def read(self) -> bytes:
        self.reader_threads.append(threading.get_ident())
        return self.body


def test_remote_jwks_is_fetched_in_a_worker_thread_not_the_event_loop() -> None:
    key = TestKey.ed25519("k1")
    source = RecordingSource(jwks_bytes(key))
    keyset = KeySet(source, algorithms=["EdDSA"], max_keys=4, cooldown_s=30, max_age_s=60)
    app = guarded_app(JWTAuthenticator(AuthSettings(), keyset))
    loop_threads: list[int] = []

    async def noting_loop_thread(scope, receive, send):  # type: ignore[no-untyped-def]
        loop_threads.append(threading.get_ident())
        await app(scope, receive, send)

    client = TestClient(noting_loop_thread)
    assert client.get("/infer", headers=bearer(make_token(key))).status_code == 200
    assert len(source.reader_threads) == 1
    assert source.reader_threads[0] != loop_threads[0]


# --- settings --------------------------------------------------------------------------------

BROKEN = [
    ('algorithms = ["HS256"]', "auth.algorithms: must be among"),
    ('algorithms = ["none"]', "auth.algorithms: must be among"),
    ('algorithms = ["EdDSA", "PS256"]', "auth.algorithms: must be among"),
    ("algorithms = []", "auth.algorithms: must name at least one"),
    ('issuer = ""', "auth.issuer: must not be empty"),
    ('audience = ""', "auth.audience: must not be empty"),
    ('jwks_url = "http://idp.example.com/jwks"', "auth.jwks_url: must be an https:// URL"),
    ('jwks_url = "ftp://idp.example.com/jwks"', "auth.jwks_url: must be an https:// URL"),
    ('jwks_url = "https://"', "auth.jwks_url: must be an https:// URL"),
    (
        'jwks_url = "https://idp.example.com/jwks"\njwks_file = "a.json"',
        "auth.jwks_url: set jwks_url or jwks_file, not both",
    ),
    ("leeway_s = 3600", "auth.leeway_s: must be <= 300"),
    ("leeway_s = 1.5", "auth.leeway_s: must be an integer"),
    ("max_token_bytes = 100", "auth.max_token_bytes: must be >= 512"),
    ("jwks_cooldown_s = 0", "auth.jwks_cooldown_s: must be >= 1.0"),
    ("failed_auth_rate_per_s = 0", "auth.failed_auth_rate_per_s: must be >="),
    ('enabled = "no"', "auth.enabled: must be true or false"),
    ("token_cache_max_entries = -1", "auth.token_cache_max_entries: must be >= 0"),
    ("jwks_file_check_interval_s = -1", "auth.jwks_file_check_interval_s: must be >= 0.0"),
    ("jwks_file_check_interval_s = 61", "auth.jwks_file_check_interval_s: must be <= 60.0"),
    ("token_cache_max_entries = 100001", "auth.token_cache_max_entries: must be <= 100000"),
    ("token_cache_max_entries = 1.5", "auth.token_cache_max_entries: must be an integer"),
    ('issur = "x"', "auth.issur: unknown key"),
]


@pytest.mark.parametrize(("line", "message"), BROKEN, ids=[m for _, m in BROKEN])
def test_unsafe_auth_settings_are_refused(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text(f"[auth]\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path)


@pytest.mark.parametrize(
    "url",
    ["https://idp.example.com/.well-known/jwks.json", "http://127.0.0.1:9/j", "http://[::1]/j"],
)
def test_jwks_url_https_or_loopback_http_is_accepted(url: str) -> None:
    assert AuthSettings(jwks_url=url).jwks_url == url


def test_defaults_are_secure() -> None:
    settings = AuthSettings()
    assert settings.enabled
    assert settings.require_typ == "at+jwt"
    assert set(settings.algorithms) == {"EdDSA", "ES256", "RS256"}
    assert not settings.metrics_open_on_loopback
    assert replace(settings, leeway_s=0).leeway_s == 0


def test_every_auth_key_is_documented_with_its_default() -> None:
    text = (ROOT / "edgeserve.toml").read_text()
    section = text.split("[auth]", 1)[1].split("\n[", 1)[0]
    documented = load_settings_text(f"[auth]\n{section}")
    for field in dataclasses.fields(AuthSettings):
        assert re.search(rf"^{field.name} = ", section, re.M), field.name
    assert documented == AuthSettings()  # the documented values are the defaults


def load_settings_text(text: str) -> AuthSettings:
    import tomllib

    from edgeserve.config.schema import parse_section

    return parse_section(AuthSettings, tomllib.loads(text)["auth"], "auth")


# --- the audit seam --------------------------------------------------------------------------


def test_each_refusal_is_reported_to_the_hook_without_the_token(
    key: TestKey, tmp_path: Path
) -> None:
    seen: list[tuple[str, str]] = []
    authenticator = build_authenticator(AuthSettings(), tmp_path, "::1")
    assert isinstance(authenticator, JWTAuthenticator)
    authenticator.on_refused = lambda client, reason: seen.append((client, reason))
    client = TestClient(guarded_app(authenticator), client=LAN_CLIENT)
    secret = make_token(key, claims(iss="someone-else"))
    assert client.get("/infer", headers=bearer(secret)).status_code == 401
    assert client.get("/infer", headers=bearer(make_token(key))).status_code == 200
    assert seen == [("198.51.100.7", "wrong issuer")]


def test_a_failing_hook_does_not_turn_401_into_500(tmp_path: Path) -> None:
    def broken(client: str, reason: str) -> None:
        raise RuntimeError("audit database is down")

    authenticator = build_authenticator(AuthSettings(), tmp_path, "::1")
    authenticator.on_refused = broken  # type: ignore[union-attr]
    client = TestClient(guarded_app(authenticator), raise_server_exceptions=False)
    assert client.get("/infer", headers=bearer("x.y.z")).status_code == 401


def test_public_api_is_exactly_what_all_lists() -> None:
    import types

    import edgeserve.auth as auth

    public = {
        name
        for name, value in vars(auth).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - {"annotations"} == set(auth.__all__)
