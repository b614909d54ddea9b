"""The failed-auth limiter cannot lock out valid tokens: a flood of token-less or bad-token
requests from one address (a NAT, a reverse proxy, the same host) is answered 429, while
every valid token from that address, over HTTP and gRPC, is still served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as triton

from edgeserve.auth import issuer
from tests.serving import RunningServer, run_server
from tests.test_auth_server import wait_until_live

pytestmark = pytest.mark.slow

BURST = 5  # failed authentications allowed per address before 429
FLOOD = 40  # token-less requests sent from the same address as the valid clients


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[RunningServer, str, Path]]:
    state_dir = tmp_path / "state"
    issuer.init_keys(state_dir)
    empty = tmp_path / "models"
    empty.mkdir()
    # A slow refill, so that the bucket stays empty for the whole test.
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{state_dir}"\n[models]\nrepository = "{empty}"\n'
        f"[auth]\nfailed_auth_burst = {BURST}\nfailed_auth_rate_per_s = 0.001\n"
    )
    with run_server(tmp_path, config_text=config, wait_ready=False) as server:
        wait_until_live(server)
        yield server, server.grpc_address(), state_dir


def token_for(state_dir: Path, subject: str) -> str:
    return issuer.create_token(state_dir, ["read"], 300, subject, "edgeserve-local", "edgeserve")


def test_token_less_flood_does_not_lock_out_valid_tokens(
    live: tuple[RunningServer, str, Path],
) -> None:
    server, grpc_url, state_dir = live
    with httpx.Client(base_url=server.url, timeout=10) as client:
        flood = [client.get("/v2").status_code for _ in range(FLOOD)]
        assert flood == [401] * BURST + [429] * (FLOOD - BURST)  # the flood itself is limited
        # Ten users behind the same address, each with a fresh (uncached) valid token.
        valid = [
            client.get("/v2", headers={"Authorization": f"Bearer {token_for(state_dir, f'u{i}')}"})
            for i in range(10)
        ]
        assert [r.status_code for r in valid] == [200] * 10
        # Garbage is still refused at once, and a bad token never reaches a 200.
        bad = client.get("/v2", headers={"Authorization": "Bearer x.y.z"})
        assert bad.status_code == 429 and int(bad.headers["retry-after"]) >= 1
    # gRPC shares the bucket of the address, and valid tokens pass there too.
    headers = {"authorization": f"Bearer {token_for(state_dir, 'grpc-user')}"}
    with triton.InferenceServerClient(grpc_url) as grpc_client:
        assert grpc_client.get_server_metadata(headers=headers).name == "edgeserve"


def test_the_dashboard_login_page_is_not_a_failed_authentication(
    live: tuple[RunningServer, str, Path],
) -> None:
    server, _, _ = live
    with httpx.Client(base_url=server.url, timeout=10) as client:
        pages = [client.get("/dashboard") for _ in range(3 * BURST)]
        assert {r.status_code for r in pages} == {200}
        assert all("token" in r.text for r in pages)
        # The bucket is untouched: the first bad tokens are 401s, not 429s.
        refused = [
            client.get("/v2", headers={"Authorization": "Bearer x.y.z"}).status_code
            for _ in range(BURST)
        ]
        assert refused == [401] * BURST
