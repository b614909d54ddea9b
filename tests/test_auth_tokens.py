"""The bad-token matrix of issue 4, through a real Starlette app guarded by `requires()`.

Every broken token is refused with 401 (or 403 for a missing scope), never 500, the
message never echoes the token, and the well-formed ones are accepted.
"""

from __future__ import annotations

import json
import random
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from edgeserve.auth.authenticator import JWTAuthenticator, build_authenticator
from edgeserve.auth.settings import AuthSettings
from tests.auth_support import (
    AUDIENCE,
    ISSUER,
    CountingServer,
    TestKey,
    b64url,
    claims,
    counting_server,
    guarded_app,
    hmac_token,
    make_token,
    unsigned_token,
    write_jwks,
)

LEEWAY_S = 30
SETTINGS = AuthSettings(issuer=ISSUER, audience=AUDIENCE, leeway_s=LEEWAY_S, failed_auth_burst=0)


@dataclass
class World:
    """Trusted keys in a JWKS file, an attacker's key, and a server that counts requests."""

    ed: TestKey
    es: TestKey
    rs: TestKey
    attacker: TestKey
    outside: CountingServer
    client: TestClient


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    state_dir = tmp_path_factory.mktemp("state")
    ed, es, rs = TestKey.ed25519("k1"), TestKey.es256("k-es"), TestKey.rs256("k-rs")
    (state_dir / "keys").mkdir()
    write_jwks(state_dir / "keys" / "jwks.json", ed, es, rs)
    authenticator = build_authenticator(SETTINGS, state_dir, "0.0.0.0")
    with (
        counting_server() as outside,
        TestClient(guarded_app(authenticator), raise_server_exceptions=False) as client,
    ):
        yield World(ed, es, rs, TestKey.ed25519("k1"), outside, client)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def now() -> int:
    return int(time.time())


def raw_claims(**replacements: str) -> bytes:
    """Claims JSON with some values replaced by raw JSON text (1e400, NaN, strings)."""
    doc = claims(**{k: f"@@{k}@@" for k in replacements})
    text = json.dumps(doc)
    for name, raw in replacements.items():
        text = text.replace(f'"@@{name}@@"', raw)
    return text.encode()


def tamper_payload(token: str) -> str:
    head, _, sig = token.split(".")
    forged = b64url(json.dumps(claims(scope="infer read admin")).encode())
    return f"{head}.{forged}.{sig}"


def tamper_signature(token: str) -> str:
    head, body, sig = token.split(".")
    flipped = ("A" if sig[5] != "A" else "B").join((sig[:5], sig[6:]))
    return f"{head}.{body}.{flipped}"


Case = Callable[[World], dict[str, str]]

# (id, headers for the request, expected status). Every request goes to /infer.
MATRIX: list[tuple[str, Case, int]] = [
    ("no header", lambda w: {}, 401),
    ("basic scheme", lambda w: {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, 401),
    ("bearer without token", lambda w: {"Authorization": "Bearer"}, 401),
    ("bearer empty token", lambda w: {"Authorization": "Bearer "}, 401),
    ("token with spaces", lambda w: {"Authorization": "Bearer a.b c.d"}, 401),
    ("garbage", lambda w: bearer("not-a-jwt-at-all"), 401),
    ("non-ascii bytes", lambda w: {b"Authorization": b"Bearer \xff\xfe.\x00.\xe9"}, 401),
    ("garbage three segments", lambda w: bearer("%%%.$$$.###"), 401),
    ("non-base64 json segments", lambda w: bearer("e30.e30.e30"), 401),
    ("two segments", lambda w: bearer(".".join(make_token(w.ed).split(".")[:2])), 401),
    ("four segments", lambda w: bearer(make_token(w.ed) + ".AAAA"), 401),
    ("1 MB token", lambda w: bearer("a" * (1 << 20)), 401),
    (
        "1 MB valid-looking token",
        lambda w: bearer(make_token(w.ed, claims(pad="x" * (1 << 20)))),
        401,
    ),
    ("header not json", lambda w: bearer(make_token(w.ed, raw_header=b"{not json")), 401),
    ("header json array", lambda w: bearer(make_token(w.ed, raw_header=b'["EdDSA"]')), 401),
    ("alg none", lambda w: bearer(unsigned_token()), 401),
    ("alg none with signature", lambda w: bearer(unsigned_token() + "AAAA"), 401),
    ("alg None capitalised", lambda w: bearer(make_token(w.ed, header={"alg": "None"})), 401),
    ("HS256 keyed with public PEM", lambda w: bearer(hmac_token(w.ed.public_pem(), "k1")), 401),
    (
        "HS256 keyed with public PEM (RSA)",
        lambda w: bearer(hmac_token(w.rs.public_pem(), "k-rs")),
        401,
    ),
    (
        "HS256 keyed with public JWK",
        lambda w: bearer(hmac_token(json.dumps(w.ed.jwk()).encode(), "k1")),
        401,
    ),
    ("alg ES512 not allowed", lambda w: bearer(make_token(w.ed, header={"alg": "ES512"})), 401),
    ("alg PS256 not allowed", lambda w: bearer(make_token(w.rs, header={"alg": "PS256"})), 401),
    ("alg RS256 on an Ed25519 kid", lambda w: bearer(make_token(w.rs, header={"kid": "k1"})), 401),
    ("alg EdDSA on an RSA kid", lambda w: bearer(make_token(w.ed, header={"kid": "k-rs"})), 401),
    ("alg not a string", lambda w: bearer(make_token(w.ed, header={"alg": ["EdDSA"]})), 401),
    ("kid missing", lambda w: bearer(make_token(w.ed, header={"kid": None})), 401),
    (
        "kid path traversal",
        lambda w: bearer(make_token(w.ed, header={"kid": "../../etc/passwd"})),
        401,
    ),
    ("kid 10 KB", lambda w: bearer(make_token(w.ed, header={"kid": "k" * 10240})), 401),
    ("kid 200 chars", lambda w: bearer(make_token(w.ed, header={"kid": "k" * 200})), 401),
    ("kid not a string", lambda w: bearer(make_token(w.ed, header={"kid": 1})), 401),
    ("kid unknown", lambda w: bearer(make_token(w.ed, header={"kid": "k2"})), 401),
    (
        "attacker key under a trusted kid",
        lambda w: bearer(make_token(w.attacker)),
        401,
    ),
    (
        "attacker key with jku",
        lambda w: bearer(
            make_token(w.attacker, header={"kid": "evil", "jku": w.outside.url("/jku")})
        ),
        401,
    ),
    (
        "attacker key with x5u",
        lambda w: bearer(
            make_token(w.attacker, header={"kid": "evil", "x5u": w.outside.url("/x5u")})
        ),
        401,
    ),
    (
        "attacker key embedded as jwk",
        lambda w: bearer(make_token(w.attacker, header={"jwk": w.attacker.jwk()})),
        401,
    ),
    ("unknown crit", lambda w: bearer(make_token(w.ed, header={"crit": ["exp"], "exp": 1})), 401),
    ("crit b64", lambda w: bearer(make_token(w.ed, header={"crit": ["b64"], "b64": False})), 401),
    ("crit empty list", lambda w: bearer(make_token(w.ed, header={"crit": []})), 401),
    ("typ missing", lambda w: bearer(make_token(w.ed, header={"typ": None})), 401),
    ("typ JWT", lambda w: bearer(make_token(w.ed, header={"typ": "JWT"})), 401),
    ("issuer prefix", lambda w: bearer(make_token(w.ed, claims(iss=ISSUER[:-1]))), 401),
    ("issuer superstring", lambda w: bearer(make_token(w.ed, claims(iss=ISSUER + "x"))), 401),
    ("issuer superstring front", lambda w: bearer(make_token(w.ed, claims(iss="x" + ISSUER))), 401),
    ("issuer list", lambda w: bearer(make_token(w.ed, claims(iss=[ISSUER]))), 401),
    ("issuer empty", lambda w: bearer(make_token(w.ed, claims(iss=""))), 401),
    ("issuer missing", lambda w: bearer(make_token(w.ed, claims(iss=None))), 401),
    ("audience wrong", lambda w: bearer(make_token(w.ed, claims(aud="billing"))), 401),
    ("audience prefix", lambda w: bearer(make_token(w.ed, claims(aud=AUDIENCE[:-1]))), 401),
    ("audience empty", lambda w: bearer(make_token(w.ed, claims(aud=""))), 401),
    ("audience empty list", lambda w: bearer(make_token(w.ed, claims(aud=[]))), 401),
    (
        "audience list without ours",
        lambda w: bearer(make_token(w.ed, claims(aud=["billing"]))),
        401,
    ),
    ("audience missing", lambda w: bearer(make_token(w.ed, claims(aud=None))), 401),
    (
        "expired beyond leeway",
        lambda w: bearer(make_token(w.ed, claims(iat=now() - 600, exp=now() - LEEWAY_S - 60))),
        401,
    ),
    ("not yet valid (nbf)", lambda w: bearer(make_token(w.ed, claims(nbf=now() + 600))), 401),
    ("issued in the future", lambda w: bearer(make_token(w.ed, claims(iat=now() + 600))), 401),
    ("exp missing", lambda w: bearer(make_token(w.ed, claims(exp=None))), 401),
    ("iat missing", lambda w: bearer(make_token(w.ed, claims(iat=None))), 401),
    ("sub missing", lambda w: bearer(make_token(w.ed, claims(sub=None))), 401),
    ("sub empty", lambda w: bearer(make_token(w.ed, claims(sub=""))), 401),
    ("sub not a string", lambda w: bearer(make_token(w.ed, claims(sub=42))), 401),
    ("exp as string", lambda w: bearer(make_token(w.ed, raw_claims(exp=f'"{now() + 300}"'))), 401),
    ("exp 1e400", lambda w: bearer(make_token(w.ed, raw_claims(exp="1e400"))), 401),
    ("exp -1e400", lambda w: bearer(make_token(w.ed, raw_claims(exp="-1e400"))), 401),
    ("exp NaN", lambda w: bearer(make_token(w.ed, raw_claims(exp="NaN"))), 401),
    ("exp Infinity", lambda w: bearer(make_token(w.ed, raw_claims(exp="Infinity"))), 401),
    ("exp float", lambda w: bearer(make_token(w.ed, raw_claims(exp=f"{now() + 300}.5"))), 401),
    ("exp true", lambda w: bearer(make_token(w.ed, raw_claims(exp="true"))), 401),
    ("exp null", lambda w: bearer(make_token(w.ed, raw_claims(exp="null"))), 401),
    ("exp 5000 digits", lambda w: bearer(make_token(w.ed, raw_claims(exp="9" * 5000))), 401),
    ("iat as string", lambda w: bearer(make_token(w.ed, raw_claims(iat=f'"{now()}"'))), 401),
    ("iat 1e400", lambda w: bearer(make_token(w.ed, raw_claims(iat="1e400"))), 401),
    ("nbf as string", lambda w: bearer(make_token(w.ed, raw_claims(nbf=f'"{now()}"'))), 401),
    ("nbf NaN", lambda w: bearer(make_token(w.ed, raw_claims(nbf="NaN"))), 401),
    ("payload not json", lambda w: bearer(make_token(w.ed, b"{nope")), 401),
    ("payload json array", lambda w: bearer(make_token(w.ed, b"[1, 2]")), 401),
    ("payload deeply nested", lambda w: bearer(make_token(w.ed, b"[" * 2000 + b"]" * 2000)), 401),
    ("scope not a string", lambda w: bearer(make_token(w.ed, claims(scope=7))), 401),
    ("tampered payload", lambda w: bearer(tamper_payload(make_token(w.ed))), 401),
    ("tampered signature", lambda w: bearer(tamper_signature(make_token(w.ed))), 401),
    ("truncated signature", lambda w: bearer(make_token(w.ed)[:-8]), 401),
    (
        "signature of another token",
        lambda w: bearer(
            ".".join(
                make_token(w.ed).split(".")[:2] + make_token(w.ed, claims(sub="b")).split(".")[2:]
            )
        ),
        401,
    ),
    ("no scope claim", lambda w: bearer(make_token(w.ed, claims(scope=None))), 403),
    (
        "valid token without the scope",
        lambda w: bearer(make_token(w.ed, claims(scope="read"))),
        403,
    ),
    ("scope as a prefix", lambda w: bearer(make_token(w.ed, claims(scope="inf"))), 403),
    ("accepted: EdDSA", lambda w: bearer(make_token(w.ed)), 200),
    ("accepted: ES256", lambda w: bearer(make_token(w.es)), 200),
    ("accepted: RS256", lambda w: bearer(make_token(w.rs)), 200),
    (
        "accepted: expired inside leeway",
        lambda w: bearer(make_token(w.ed, claims(iat=now() - 600, exp=now() - LEEWAY_S // 3))),
        200,
    ),
    ("accepted: nbf inside leeway", lambda w: bearer(make_token(w.ed, claims(nbf=now() + 5))), 200),
    (
        "accepted: audience list",
        lambda w: bearer(make_token(w.ed, claims(aud=["x", AUDIENCE]))),
        200,
    ),
    (
        "accepted: typ media type",
        lambda w: bearer(make_token(w.ed, header={"typ": "application/AT+JWT"})),
        200,
    ),
    (
        "accepted: scp list",
        lambda w: bearer(make_token(w.ed, claims(scope=None, scp=["infer"]))),
        200,
    ),
    ("accepted: lower-case scheme", lambda w: {"Authorization": "bearer " + make_token(w.ed)}, 200),
    (
        "accepted: jku/x5u/jwk ignored",
        lambda w: bearer(
            make_token(
                w.ed,
                header={
                    "jku": w.outside.url("/jku"),
                    "x5u": w.outside.url("/x5u"),
                    "jwk": w.attacker.jwk(),
                },
            )
        ),
        200,
    ),
]


@pytest.mark.parametrize(
    ("case", "expected"), [(c, e) for _, c, e in MATRIX], ids=[i for i, _, _ in MATRIX]
)
def test_token_matrix(world: World, case: Case, expected: int) -> None:
    headers = case(world)
    response = world.client.get("/infer", headers=headers)
    assert response.status_code == expected, response.text
    challenge = response.headers.get("www-authenticate", "")
    if expected == 401:
        assert challenge.startswith("Bearer")
        assert response.json()["error"].startswith("invalid token")
    elif expected == 403:
        assert challenge == 'Bearer error="insufficient_scope", scope="infer"'
        assert "insufficient_scope" in response.json()["error"]
    else:
        assert response.json()["sub"] in ("alice",)
    token = str(headers.get("Authorization", "")).partition(" ")[2]
    for part in {token, *token.split(".")} - {""}:
        if len(part) >= 8:
            assert part not in response.text and part not in challenge


def test_bad_token_gets_invalid_token_challenge_and_no_token_gets_bare_one(world: World) -> None:
    missing = world.client.get("/infer")
    assert missing.headers["www-authenticate"] == "Bearer"
    bad = world.client.get("/infer", headers=bearer("x.y.z"))
    assert bad.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_jku_x5u_and_jwk_headers_are_never_fetched(world: World) -> None:
    for _, case, _ in MATRIX:
        world.client.get("/infer", headers=case(world))
    assert world.outside.total_hits == 0


def test_two_authorization_headers_are_refused(world: World) -> None:
    good = "Bearer " + make_token(world.ed)
    response = world.client.get(
        "/infer", headers=[("Authorization", good), ("Authorization", good)]
    )
    assert response.status_code == 401


def test_principal_is_stored_with_its_scopes(world: World) -> None:
    token = make_token(world.ed, claims(scope="infer admin unknown-scope"))
    response = world.client.get("/admin", headers=bearer(token))
    assert response.status_code == 200
    assert response.json() == {"sub": "alice", "scopes": ["admin", "infer", "unknown-scope"]}


def test_token_signed_by_a_removed_key_is_refused_after_rotation(tmp_path: Path) -> None:
    old, new = TestKey.ed25519("old"), TestKey.ed25519("new")
    jwks = tmp_path / "keys" / "jwks.json"
    jwks.parent.mkdir()
    write_jwks(jwks, old)
    settings = replace(SETTINGS, jwks_file_check_interval_s=0)  # look at the file every time
    client = TestClient(guarded_app(build_authenticator(settings, tmp_path, "127.0.0.1")))
    old_token, new_token = make_token(old), make_token(new)
    assert client.get("/infer", headers=bearer(old_token)).status_code == 200
    assert client.get("/infer", headers=bearer(new_token)).status_code == 401

    write_jwks(jwks, new, old)  # rotation: both keys side by side, no restart
    assert client.get("/infer", headers=bearer(old_token)).status_code == 200
    assert client.get("/infer", headers=bearer(new_token)).status_code == 200

    write_jwks(jwks, new)  # the old key is retired
    assert client.get("/infer", headers=bearer(old_token)).status_code == 401
    assert client.get("/infer", headers=bearer(new_token)).status_code == 200


def random_kid(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(4, 40)))


def test_a_thousand_random_kids_cost_at_most_one_jwks_fetch() -> None:
    key = TestKey.ed25519("good")
    rng = random.Random(4)
    with counting_server() as idp:
        url = idp.serve("/jwks", json.dumps({"keys": [key.jwk()]}).encode())
        settings = replace(SETTINGS, jwks_url=url, jwks_cooldown_s=3600)
        authenticator = build_authenticator(settings, Path("/nonexistent"), "127.0.0.1")
        client = TestClient(guarded_app(authenticator), raise_server_exceptions=False)
        statuses = {
            client.get(
                "/infer", headers=bearer(make_token(key, header={"kid": random_kid(rng)}))
            ).status_code
            for _ in range(1000)
        }
        assert statuses == {401}
        assert idp.hits["/jwks"] <= 1
        # The one fetch that did happen brought the real key in: good tokens still work.
        assert client.get("/infer", headers=bearer(make_token(key))).status_code == 200
        assert idp.hits["/jwks"] <= 1


def test_malformed_kids_never_reach_the_jwks_url() -> None:
    key = TestKey.ed25519("good")
    with counting_server() as idp:
        url = idp.serve("/jwks", json.dumps({"keys": [key.jwk()]}).encode())
        authenticator = build_authenticator(replace(SETTINGS, jwks_url=url), Path("/x"), "::1")
        client = TestClient(guarded_app(authenticator))
        for kid in ("../../etc/passwd", "k" * 10240, "a/b", "", "kid with space"):
            token = make_token(key, header={"kid": kid})
            assert client.get("/infer", headers=bearer(token)).status_code == 401
        assert idp.total_hits == 0


def test_authenticator_is_a_jwt_authenticator_when_enabled(world: World) -> None:
    assert isinstance(world.client.app.state.authenticator, JWTAuthenticator)  # type: ignore[attr-defined]
