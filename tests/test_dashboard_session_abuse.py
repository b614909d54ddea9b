"""The dashboard's session against a hostile browser page or Host header (issue 18):
login CSRF is refused on Origin, the cookie is Secure behind an https public URL, and
the trailing-slash redirect is relative."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from edgeserve.auth import issuer
from tests.serving import RunningServer, run_server
from tests.test_auth_server import wait_until_live

pytestmark = pytest.mark.slow

PUBLIC = "https://box.shop.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    root = tmp_path_factory.mktemp("dash")
    issuer.init_keys(root / "state")
    empty = root / "models"
    empty.mkdir()
    reader = issuer.create_token(
        root / "state", ["read"], 600, "viewer", "edgeserve-local", "edgeserve"
    )
    with _serving(root, empty, "") as s:
        yield s, reader


@contextmanager
def _serving(root: Path, empty: Path, server_keys: str) -> Iterator[RunningServer]:
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\nstate_dir = "state"\n{server_keys}'
        f'[models]\nrepository = "{empty}"\n[auth]\nfailed_auth_burst = 0\n'
    )
    with run_server(root, config_text=config, wait_ready=False) as s:
        wait_until_live(s)
        yield s


def _login(url: str, token: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{url}/dashboard/session",
        data={"token": token},
        headers=headers,
        follow_redirects=False,
    )


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example"])
def test_a_login_posted_from_another_site_is_refused(
    server: tuple[RunningServer, str], origin: str
) -> None:
    srv, reader = server
    reply = _login(srv.url, reader, {"origin": origin})
    assert reply.status_code == 403
    assert "set-cookie" not in reply.headers


def test_a_login_from_the_servers_own_page_or_without_origin_opens_a_session(
    server: tuple[RunningServer, str],
) -> None:
    srv, reader = server
    for headers in ({"origin": srv.url}, {}):
        reply = _login(srv.url, reader, headers)
        assert reply.status_code == 303, reply.text
        assert "edgeserve_dashboard=" in reply.headers["set-cookie"]
        assert "secure" not in reply.headers["set-cookie"].lower()  # plain http, no public URL


@pytest.mark.parametrize("path", ["/dashboard/", "/dashboard/?x=1"])
def test_the_trailing_slash_redirect_never_names_the_host(
    server: tuple[RunningServer, str], path: str
) -> None:
    srv, _ = server
    reply = httpx.get(srv.url + path, headers={"host": "evil.example"}, follow_redirects=False)
    assert reply.status_code in (307, 308)
    assert reply.headers["location"] == "/dashboard" + path[len("/dashboard/") :]


def test_a_path_that_would_redirect_off_site_is_not_redirected(
    server: tuple[RunningServer, str],
) -> None:
    srv, _ = server
    with httpx.Client() as client:
        request = client.build_request("GET", srv.url + "/")
        request.url = request.url.copy_with(raw_path=b"//evil.example/")
        reply = client.send(request, follow_redirects=False)
    assert not reply.headers.get("location", "").startswith("//")


def test_behind_an_https_public_url_the_cookie_is_secure_and_only_that_origin_logs_in(
    tmp_path: Path,
) -> None:
    issuer.init_keys(tmp_path / "state")
    empty = tmp_path / "models"
    empty.mkdir()
    reader = issuer.create_token(
        tmp_path / "state", ["read"], 600, "viewer", "edgeserve-local", "edgeserve"
    )
    with _serving(tmp_path, empty, f'public_url = "{PUBLIC}"\n') as srv:
        assert _login(srv.url, reader, {"origin": srv.url}).status_code == 403
        reply = _login(srv.url, reader, {"origin": PUBLIC})
        assert reply.status_code == 303
        assert "secure" in reply.headers["set-cookie"].lower()
