"""Auth in a real `edgeserve serve` process on loopback: tokens over the wire, health
open, scopes per route, rotation without restart, and no auth-off beyond loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from edgeserve.auth import issuer
from tests.auth_support import TestKey, b64url, claims, hmac_token, make_token
from tests.serving import RunningServer, run_server
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    tmp = tmp_path_factory.mktemp("auth-server")
    state_dir = tmp / "state"
    issuer.init_keys(state_dir)
    empty = tmp / "models"
    empty.mkdir()
    # No models: the server is live at once (ready stays 503, which is all we need).
    config = "[auth]\nfailed_auth_burst = 0\n"
    with run_server(tmp, config, repository=empty, wait_ready=False) as server:
        wait_until_live(server)
        yield server, state_dir


def wait_until_live(server: RunningServer, timeout_s: float = 60.0) -> None:

    def live() -> bool:
        assert server.process.poll() is None, server.log()
        try:
            return httpx.get(server.url + "/v2/health/live", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(live, timeout_s, lambda: f"the server to be live:\n{server.log()}")


def token_for(state_dir: Path, *scopes: str, ttl_s: int = 300) -> str:
    return issuer.create_token(state_dir, scopes, ttl_s, "it", "edgeserve-local", "edgeserve")


def get(server: RunningServer, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(server.url + path, headers=headers, timeout=10)


def test_health_endpoints_need_no_token(live: tuple[RunningServer, Path]) -> None:
    server, _ = live
    assert get(server, "/v2/health/live").status_code == 200
    assert get(server, "/v2/health/ready").status_code in (200, 503)  # never 401


def test_everything_else_needs_a_token(live: tuple[RunningServer, Path]) -> None:
    server, state_dir = live
    refused = get(server, "/v2")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert get(server, "/v2", token_for(state_dir, "read")).status_code == 200


def test_scopes_are_enforced_per_route(live: tuple[RunningServer, Path]) -> None:
    server, state_dir = live
    url = server.url + "/v2/models/nosuchmodel/infer"
    body = {"inputs": []}
    read_only = {"Authorization": f"Bearer {token_for(state_dir, 'read')}"}
    infer = {"Authorization": f"Bearer {token_for(state_dir, 'infer')}"}
    forbidden = httpx.post(url, json=body, headers=read_only, timeout=10)
    assert forbidden.status_code == 403
    assert 'error="insufficient_scope"' in forbidden.headers["www-authenticate"]
    assert httpx.post(url, json=body, headers=infer, timeout=10).status_code == 404  # past auth


@pytest.mark.parametrize("path", ["/api/telemetry/status", "/api/models/nosuchmodel/update", "/v2"])
def test_admin_implies_read(live: tuple[RunningServer, Path], path: str) -> None:
    server, state_dir = live
    admin = token_for(state_dir, "admin")
    reply = get(server, path, admin)
    assert reply.status_code != 403, reply.text
    assert reply.status_code in (200, 404), reply.text  # 404: the repository is empty
    assert get(server, path, token_for(state_dir, "infer")).status_code == 403


def test_admin_token_opens_the_dashboard(live: tuple[RunningServer, Path]) -> None:
    server, state_dir = live

    def session(token: str) -> int:
        form = {"token": token}
        return httpx.post(server.url + "/dashboard/session", data=form, timeout=10).status_code

    assert session(token_for(state_dir, "admin")) == 303  # to the dashboard, with a cookie
    assert session(token_for(state_dir, "infer")) == 401


def test_bad_tokens_over_the_wire_are_401_never_500(live: tuple[RunningServer, Path]) -> None:
    server, state_dir = live
    good = token_for(state_dir, "read")
    head, body, sig = good.split(".")
    kid = jwt.get_unverified_header(good)["kid"]
    jwk = json.loads((state_dir / "keys" / "jwks.json").read_text())["keys"][0]
    none_header = b64url(json.dumps({"alg": "none", "kid": kid}).encode())
    bad = [
        "garbage",
        f"{head}.{body}",
        f"{none_header}.{body}.",
        f"{none_header}.{body}.{sig}",
        hmac_token(json.dumps(jwk).encode(), kid),
        f"{head}.{b64url(b'{}')}.{sig}",
        f"{head}.{body}.{sig[:-4]}AAAA",
        make_token(TestKey.ed25519(kid), claims()),
        make_token(TestKey.ed25519("x"), claims()),
        "a" * 9000,
    ]
    for value in bad:
        response = get(server, "/v2", value)
        assert response.status_code == 401, response.text
        assert value not in response.text


def wait_for_status(
    server: RunningServer, path: str, token: str, status: int, timeout_s: float = 30.0
) -> None:
    """Poll until `path` answers `status`: the JWKS file is looked at once a second."""
    got: list[int] = []

    def answers() -> bool:
        got.append(get(server, path, token).status_code)
        return got[-1] == status

    wait_until(answers, timeout_s, lambda: f"{status} (still {got[-1]})", interval_s=0.1)


def test_rotation_is_picked_up_without_a_restart(live: tuple[RunningServer, Path]) -> None:
    server, state_dir = live
    old = token_for(state_dir, "read")
    assert get(server, "/v2", old).status_code == 200  # verified once, then cached
    issuer.rotate_signing_key(state_dir, keep_previous=1)
    new = token_for(state_dir, "read")
    wait_for_status(server, "/v2", new, 200)
    assert get(server, "/v2", old).status_code == 200
    issuer.rotate_signing_key(state_dir, keep_previous=0)
    wait_for_status(server, "/v2", old, 401)
    assert get(server, "/v2", new).status_code == 401
    assert get(server, "/v2", token_for(state_dir, "read")).status_code == 200


def test_auth_off_beyond_loopback_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "edgeserve.toml"
    config.write_text(
        f'[server]\nhost = "0.0.0.0"\nport = 0\nstate_dir = "{tmp_path}/s"\n'
        f'[models]\nrepository = "{tmp_path}"\n[auth]\nenabled = false\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "edgeserve", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "auth.enabled" in result.stderr and "loopback" in result.stderr
