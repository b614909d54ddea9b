"""The verified-token cache: a valid token's signature is checked once, then the token is
served from a bounded LRU until the earlier of `exp - leeway` and a change of the trusted
keys; refused tokens never enter it. Handler-level tests use real keys and the real
authenticator (with the cache's clock injected); the behaviour over the wire is checked
against a real server on HTTP, gRPC and WebSocket."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from click.testing import CliRunner
from starlette.testclient import TestClient
from tritonclient.utils import InferenceServerException
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from edgeserve.auth import AuthSettings, JWTAuthenticator, build_authenticator, issuer
from edgeserve.auth.cli import keys
from edgeserve.auth.keyset import KeySet, URLSource
from edgeserve.auth.token_cache import VerifiedTokenCache
from tests.auth_support import (
    CountingServer,
    TestKey,
    claims,
    counting_server,
    guarded_app,
    jwks_bytes,
    make_token,
    unsigned_token,
    write_jwks,
)
from tests.serving import RunningServer, run_server
from tests.test_batch_support import digits_rows, v2_request
from tests.waiting import wait_until

LAN_CLIENT = ("198.51.100.7", 40000)
# No failed-auth limit: these tests send many refused tokens on purpose. The JWKS file is
# looked at on every request here; the shipped once-a-second check has its own test.
SETTINGS = AuthSettings(failed_auth_burst=0, jwks_file_check_interval_s=0)


class FakeClock:
    """Wall-clock seconds that move only when told (JWT times are wall-clock)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def key(tmp_path: Path) -> TestKey:
    key = TestKey.ed25519("k1")
    (tmp_path / "keys").mkdir()
    write_jwks(tmp_path / "keys" / "jwks.json", key)
    return key


def authenticator_for(
    tmp_path: Path, settings: AuthSettings = SETTINGS, clock: FakeClock | None = None
) -> JWTAuthenticator:
    authenticator = build_authenticator(settings, tmp_path, "0.0.0.0")
    assert isinstance(authenticator, JWTAuthenticator)
    if clock is not None:
        authenticator.cache.clock = clock
    return authenticator


def client_of(authenticator: JWTAuthenticator) -> TestClient:
    return TestClient(guarded_app(authenticator), client=LAN_CLIENT, raise_server_exceptions=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def status(client: TestClient, token: str) -> int:
    return client.get("/infer", headers=bearer(token)).status_code


# --- hits and misses -------------------------------------------------------------------------


def test_a_verified_token_is_checked_once_then_served_from_the_cache(
    key: TestKey, tmp_path: Path
) -> None:
    authenticator = authenticator_for(tmp_path)
    client = client_of(authenticator)
    token = make_token(key)
    for _ in range(5):
        response = client.get("/infer", headers=bearer(token))
        assert response.status_code == 200
        assert response.json() == {"sub": "alice", "scopes": ["infer", "read"]}
    cache = authenticator.cache
    assert (cache.misses, cache.hits, len(cache)) == (1, 4, 1)
    assert cache.lookups() == {("hit",): 4, ("miss",): 1}


def test_the_cache_holds_digests_never_tokens(key: TestKey, tmp_path: Path) -> None:
    authenticator = authenticator_for(tmp_path)
    token = make_token(key)
    assert status(client_of(authenticator), token) == 200
    (stored,) = authenticator.cache._entries  # the dict a memory dump would show
    assert isinstance(stored, bytes) and len(stored) == 32
    assert token.encode() not in stored and stored not in token.encode()


def test_size_zero_turns_the_cache_off(key: TestKey, tmp_path: Path) -> None:
    authenticator = authenticator_for(tmp_path, replace(SETTINGS, token_cache_max_entries=0))
    client = client_of(authenticator)
    for _ in range(3):
        assert status(client, make_token(key)) == 200
    assert len(authenticator.cache) == 0 and authenticator.cache.hits == 0


# --- time-based claims -------------------------------------------------------------------------


def test_a_cached_token_is_not_served_from_exp_minus_leeway_on(
    key: TestKey, tmp_path: Path
) -> None:
    clock = FakeClock()
    authenticator = authenticator_for(tmp_path, clock=clock)
    client = client_of(authenticator)
    exp = int(clock.now) + 300
    token = make_token(key, claims(exp=exp))
    assert status(client, token) == 200
    assert status(client, token) == 200
    assert authenticator.cache.hits == 1

    clock.now = exp - SETTINGS.leeway_s - 0.5  # the last instant a hit is allowed
    assert status(client, token) == 200
    assert authenticator.cache.hits == 2

    clock.now = exp - SETTINGS.leeway_s  # from here on the cache must not vouch for it
    misses = authenticator.cache.misses
    assert status(client, token) == 200  # re-verified: pyjwt's clock says it is still valid
    assert status(client, token) == 200
    assert authenticator.cache.misses == misses + 2  # never a hit again
    assert authenticator.cache.hits == 2
    assert len(authenticator.cache) == 0  # and not put back


def test_a_token_is_not_served_before_nbf_when_the_clock_goes_back(
    key: TestKey, tmp_path: Path
) -> None:
    clock = FakeClock()
    authenticator = authenticator_for(tmp_path, clock=clock)
    client = client_of(authenticator)
    now = int(clock.now)
    token = make_token(key, claims(iat=now - 10, nbf=now - 10))
    assert status(client, token) == 200
    assert status(client, token) == 200
    assert authenticator.cache.hits == 1
    clock.now = now - 10 - SETTINGS.leeway_s - 1  # e.g. NTP steps the clock back
    status(client, token)
    assert authenticator.cache.hits == 1  # re-checked on the hit, so not served from cache


def test_a_token_too_close_to_exp_is_never_cached(key: TestKey, tmp_path: Path) -> None:
    authenticator = authenticator_for(tmp_path)
    token = make_token(key, claims(exp=int(time.time()) + SETTINGS.leeway_s - 5))
    assert status(client_of(authenticator), token) == 200  # still within pyjwt's leeway
    assert len(authenticator.cache) == 0


# --- refused tokens ---------------------------------------------------------------------------


def bad_tokens(key: TestKey) -> dict[str, str]:
    good = make_token(key)
    head, body, sig = good.split(".")
    now = int(time.time())
    return {
        "bad signature": f"{head}.{body}.{sig[:-4]}AAAA",
        "other key, same kid": make_token(TestKey.ed25519(key.kid)),
        "unknown kid": make_token(TestKey.ed25519("nope")),
        "expired": make_token(key, claims(exp=now - 3600, iat=now - 7200)),
        "not yet valid": make_token(key, claims(nbf=now + 3600)),
        "wrong issuer": make_token(key, claims(iss="someone-else")),
        "wrong audience": make_token(key, claims(aud="other")),
        "unsigned": unsigned_token(kid=key.kid),
        "garbage": "x.y.z",
    }


def test_refused_tokens_are_never_cached_and_evict_nothing(key: TestKey, tmp_path: Path) -> None:
    authenticator = authenticator_for(tmp_path, replace(SETTINGS, token_cache_max_entries=2))
    client = client_of(authenticator)
    good = make_token(key)
    assert status(client, good) == 200
    for name, token in bad_tokens(key).items():
        for _ in range(20):
            assert status(client, token) == 401, name
    assert len(authenticator.cache) == 1
    hits = authenticator.cache.hits
    assert status(client, good) == 200
    assert authenticator.cache.hits == hits + 1  # the good token survived the flood


def test_a_token_refused_for_its_scope_is_still_a_valid_token(key: TestKey, tmp_path: Path) -> None:
    authenticator = authenticator_for(tmp_path)
    client = client_of(authenticator)
    token = make_token(key, claims(scope="read"))
    assert status(client, token) == 403
    assert status(client, token) == 403  # the scope is checked on every request, hit or not
    assert authenticator.cache.hits == 1


# --- the bound -------------------------------------------------------------------------------


def test_the_lru_bound_holds_and_the_least_recent_go_first(key: TestKey, tmp_path: Path) -> None:
    bound = 8
    authenticator = authenticator_for(tmp_path, replace(SETTINGS, token_cache_max_entries=bound))
    client = client_of(authenticator)
    tokens = [make_token(key, claims(jti=f"t{i}")) for i in range(bound + 5)]
    for token in tokens:
        assert status(client, token) == 200
        assert len(authenticator.cache) <= bound
    assert len(authenticator.cache) == bound
    hits = authenticator.cache.hits
    assert status(client, tokens[-1]) == 200
    assert authenticator.cache.hits == hits + 1  # the newest is still there
    assert status(client, tokens[0]) == 200
    assert authenticator.cache.hits == hits + 1  # the oldest was evicted
    assert len(authenticator.cache) == bound


# --- key-set changes ------------------------------------------------------------------------


def run_keys(config: Path, *args: str) -> None:
    result = CliRunner().invoke(keys, [*args, "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture
def local_issuer(tmp_path: Path) -> Path:
    """A config whose local issuer keys were made by the real `edgeserve keys init`."""
    config = tmp_path / "edgeserve.toml"
    config.write_text(
        '[server]\nstate_dir = "state"\n'
        "[auth]\nfailed_auth_burst = 0\njwks_file_check_interval_s = 0\n"
    )
    run_keys(config, "init")
    return config


def test_rotation_and_revocation_through_the_cli_empty_the_cache(local_issuer: Path) -> None:
    state_dir = local_issuer.parent / "state"
    authenticator = authenticator_for(state_dir)
    client = client_of(authenticator)
    old = issuer.create_token(state_dir, ["infer"], 300, "a", "edgeserve-local", "edgeserve")
    assert status(client, old) == 200
    assert status(client, old) == 200
    assert len(authenticator.cache) == 1

    run_keys(local_issuer, "rotate-signing-key")  # the old key stays trusted
    misses = authenticator.cache.misses
    assert status(client, old) == 200
    assert authenticator.cache.misses == misses + 1  # emptied: verified again, not a hit

    run_keys(local_issuer, "rotate-signing-key", "--keep-previous", "0")  # old key revoked
    assert status(client, old) == 401
    assert len(authenticator.cache) == 0
    new = issuer.create_token(state_dir, ["infer"], 300, "a", "edgeserve-local", "edgeserve")
    assert status(client, new) == 200


def test_a_key_removed_from_the_jwks_file_refuses_its_cached_tokens(tmp_path: Path) -> None:
    a, b = TestKey.ed25519("a"), TestKey.es256("b")
    (tmp_path / "keys").mkdir()
    jwks = tmp_path / "keys" / "jwks.json"
    write_jwks(jwks, a, b)
    authenticator = authenticator_for(tmp_path)
    client = client_of(authenticator)
    by_a, by_b = make_token(a), make_token(b)
    for token in (by_a, by_b, by_a, by_b):
        assert status(client, token) == 200
    assert authenticator.cache.hits == 2
    write_jwks(jwks, b)
    assert status(client, by_a) == 401
    assert status(client, by_b) == 200


def test_the_same_kid_with_new_key_material_refuses_cached_tokens(tmp_path: Path) -> None:
    old, new = TestKey.ed25519("k"), TestKey.ed25519("k")
    (tmp_path / "keys").mkdir()
    jwks = tmp_path / "keys" / "jwks.json"
    write_jwks(jwks, old)
    authenticator = authenticator_for(tmp_path)
    client = client_of(authenticator)
    token = make_token(old)
    assert status(client, token) == 200
    write_jwks(jwks, new)
    assert status(client, token) == 401


def test_with_the_shipped_interval_a_revoked_key_is_refused_within_a_second(
    key: TestKey, tmp_path: Path
) -> None:
    """One stat of the JWKS file per interval, not per request: until the interval has
    passed a cached token is still served; from then on it is refused."""
    shipped = AuthSettings().jwks_file_check_interval_s
    settings = replace(SETTINGS, jwks_file_check_interval_s=shipped)
    authenticator = authenticator_for(tmp_path, settings)
    keyset_clock = FakeClock()
    authenticator.keyset.clock = keyset_clock
    client = client_of(authenticator)
    token = make_token(key)
    assert status(client, token) == 200
    assert status(client, token) == 200
    write_jwks(tmp_path / "keys" / "jwks.json", TestKey.ed25519("other"))  # key revoked
    keyset_clock.advance(settings.jwks_file_check_interval_s / 2)
    assert status(client, token) == 200  # not looked at yet
    keyset_clock.advance(settings.jwks_file_check_interval_s / 2)
    assert status(client, token) == 401
    assert len(authenticator.cache) == 0


def test_rewriting_the_same_keys_keeps_the_cache(key: TestKey, tmp_path: Path) -> None:
    authenticator = authenticator_for(tmp_path)
    client = client_of(authenticator)
    token = make_token(key)
    assert status(client, token) == 200
    write_jwks(tmp_path / "keys" / "jwks.json", key)  # a new file, the same keys
    assert status(client, token) == 200
    assert authenticator.cache.hits == 1


@pytest.fixture
def idp() -> Iterator[CountingServer]:
    with counting_server() as server:
        yield server


def test_a_jwks_url_refresh_that_drops_a_key_refuses_its_cached_tokens(
    idp: CountingServer,
) -> None:
    a, b = TestKey.ed25519("a"), TestKey.ed25519("b")
    url = idp.serve("/jwks", jwks_bytes(a, b))
    keyset_clock = FakeClock()
    settings = replace(SETTINGS, jwks_url=url, jwks_max_age_s=600)
    keyset = KeySet(
        URLSource(url, timeout_s=2.0, max_bytes=64 * 1024),
        algorithms=settings.algorithms,
        max_keys=16,
        cooldown_s=30,
        max_age_s=600,
        clock=keyset_clock,
    )
    authenticator = JWTAuthenticator(settings, keyset)
    client = client_of(authenticator)
    by_a, by_b = make_token(a), make_token(b)
    for token in (by_a, by_b, by_a, by_b):
        assert status(client, token) == 200
    assert authenticator.cache.hits == 2
    idp.serve("/jwks", jwks_bytes(b))  # the provider retires "a"
    keyset_clock.advance(601)  # the keys are due for a refetch
    assert status(client, by_a) == 401
    assert idp.hits["/jwks"] == 2
    assert status(client, by_b) == 200


# --- the cache on its own -----------------------------------------------------------------------


def test_put_ignores_a_verification_made_under_an_older_key_set(
    key: TestKey, tmp_path: Path
) -> None:
    """A request verified with keys that changed meanwhile must not repopulate the cache."""
    authenticator = authenticator_for(tmp_path)
    principal = authenticator.verifier.verify(make_token(key))
    cache = VerifiedTokenCache(16, leeway_s=30)
    k = cache.key("t")
    assert cache.get(k, generation=2) is None  # the cache has seen generation 2
    cache.put(k, principal, generation=1)  # verified before the change
    assert len(cache) == 0
    cache.put(k, principal, generation=2)
    assert cache.get(k, generation=2) is principal
    assert cache.get(k, generation=3) is None and len(cache) == 0


def test_digests_are_keyed_per_process() -> None:
    one, two = VerifiedTokenCache(4, leeway_s=0), VerifiedTokenCache(4, leeway_s=0)
    assert one.key("token") == one.key("token")  # the keyed state is copied, never consumed
    assert one.key("token") != two.key("token")
    assert one.key("token") != one.key("token2") and len(one.key("token")) == 32


# --- a real server: HTTP, gRPC and WebSocket share the cache ---------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str, Path]]:
    folder = tmp_path_factory.mktemp("token-cache")
    state_dir = folder / "state"
    issuer.init_keys(state_dir)
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{state_dir}"\n'
        f'[models]\nrepository = "{Path(__file__).resolve().parent.parent / "models"}"\n'
        'load = ["digits"]\n'
        # leeway 0: a token is refused from its exp on, so the test waits at most its ttl.
        # The JWKS file check keeps its shipped interval.
        "[auth]\nfailed_auth_burst = 0\nleeway_s = 0\n"
    )
    with run_server(folder, config_text=config) as server:
        yield server, server.grpc_address(), state_dir


def new_token(state_dir: Path, ttl_s: int = 300) -> str:
    return issuer.create_token(state_dir, ["infer"], ttl_s, "it", "edgeserve-local", "edgeserve")


def http_status(server: RunningServer, token: str) -> int:
    x, _ = digits_rows()
    response = httpx.post(
        f"{server.url}/v2/models/digits/infer",
        json=v2_request(x[:1], ["label"]),
        headers=bearer(token),
        timeout=10,
    )
    return response.status_code


def grpc_ok(url: str, token: str) -> bool:
    x, _ = digits_rows()
    data = triton.InferInput("input", [1, x.shape[1]], "FP32")
    data.set_data_from_numpy(x[:1].astype(np.float32))
    try:
        with triton.InferenceServerClient(url) as client:
            client.infer("digits", [data], headers={"authorization": f"Bearer {token}"})
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.UNAUTHENTICATED", exc
        return False
    return True


def websocket_ok(server: RunningServer, token: str) -> bool:
    url = server.url.replace("http://", "ws://") + "/api/stream/digits"
    x, _ = digits_rows()
    try:
        with connect(url, additional_headers=bearer(token)) as ws:
            ws.send(json.dumps(v2_request(x[:1], ["label"])))
            assert "outputs" in json.loads(ws.recv(timeout=10))
    except InvalidStatus as exc:
        assert exc.response.status_code == 403  # a refused handshake closes before accept
        return False
    return True


@pytest.mark.slow
def test_a_cached_token_stops_working_at_its_exp(live: tuple[RunningServer, str, Path]) -> None:
    server, _, state_dir = live
    assert http_status(server, new_token(state_dir)) == 200  # warm: the next two are quick
    token = new_token(state_dir, ttl_s=5)
    assert http_status(server, token) == 200
    assert http_status(server, token) == 200  # cached now
    wait_until(
        lambda: http_status(server, token) != 200,
        30,
        "the expired token to be refused",
        interval_s=0.1,
    )
    for _ in range(3):
        assert http_status(server, token) == 401


@pytest.mark.slow
def test_revoking_the_key_refuses_cached_tokens_on_every_transport(
    live: tuple[RunningServer, str, Path],
) -> None:
    server, grpc_url, state_dir = live
    token = new_token(state_dir)
    for _ in range(2):  # the second round is served from the cache
        assert http_status(server, token) == 200
        assert grpc_ok(grpc_url, token)
        assert websocket_ok(server, token)
    run_keys(server.config_path, "rotate-signing-key", "--keep-previous", "0")
    wait_until(  # the server looks at the JWKS file once a second
        lambda: http_status(server, token) == 401,
        30,
        "a token of the revoked key to be refused",
        interval_s=0.1,
    )
    assert not grpc_ok(grpc_url, token)
    assert not websocket_ok(server, token)
    fresh = new_token(state_dir)
    assert http_status(server, fresh) == 200
    assert grpc_ok(grpc_url, fresh)


def test_cache_hits_and_misses_are_counted_on_metrics(
    live: tuple[RunningServer, str, Path],
) -> None:
    server, _, state_dir = live

    def lookups(result: str) -> float:
        scraper = issuer.create_token(
            state_dir, ["metrics"], 300, "m", "edgeserve-local", "edgeserve"
        )
        text = httpx.get(f"{server.url}/metrics", headers=bearer(scraper), timeout=10).text
        line = f'edgeserve_auth_token_cache_lookups_total{{result="{result}"}} '
        return float(next(s for s in text.splitlines() if s.startswith(line)).split()[1])

    hits = lookups("hit")
    token = new_token(state_dir)
    for _ in range(3):
        assert http_status(server, token) == 200
    assert lookups("hit") >= hits + 2  # the first of the three was a miss
