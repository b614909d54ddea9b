"""Inference requests skip Starlette's middleware stack (edgeserve/http/dispatch.py);
on a real server they must still get everything the stack gave them: security headers,
the audit row of a 403, the same error bodies, and CORS when it is configured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgeserve.auth.issuer import create_token, init_keys
from edgeserve.http.headers import SECURITY_HEADERS
from tests.serving import MODELS, RunningServer, run_server
from tests.test_audit_server import wait_for

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}
ORIGIN = "http://till.shop.example"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    tmp = tmp_path_factory.mktemp("dispatch")
    init_keys(tmp / "state")
    with run_server(tmp, "[auth]\nenabled = true\n") as running:
        yield running, tmp / "state"


def bearer(state_dir: Path, *scopes: str, subject: str = "till") -> dict[str, str]:
    token = create_token(state_dir, scopes, 300, subject, "edgeserve-local", "edgeserve")
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("path", "version"),
    [("/v2/models/digits/infer", "2"), ("/v2/models/digits/versions/1/infer", "1")],
)
def test_an_answer_carries_the_security_headers_and_names_its_version(
    secured: tuple[RunningServer, Path], path: str, version: str
) -> None:
    server, state_dir = secured
    reply = httpx.post(server.url + path, json=BODY, headers=bearer(state_dir, "infer"))
    assert reply.status_code == 200, reply.text
    assert reply.json()["model_version"] == version
    for name, value in SECURITY_HEADERS:
        assert reply.headers[name.decode()] == value.decode()
    assert reply.headers["x-request-id"]


def test_a_repeated_request_header_is_read_as_its_first_value(
    secured: tuple[RunningServer, Path],
) -> None:
    server, state_dir = secured
    headers = [
        *bearer(state_dir, "infer").items(),
        ("X-Request-Id", "first"),
        ("x-request-id", "2"),
    ]
    reply = httpx.post(server.url + "/v2/models/digits/infer", json=BODY, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-request-id"] == "first"  # as Starlette's Headers reads it
    assert int(reply.headers["x-telemetry-seq"].rpartition("-")[2]) > 0


def test_errors_keep_their_status_body_and_headers(secured: tuple[RunningServer, Path]) -> None:
    server, state_dir = secured
    auth = bearer(state_dir, "infer")
    unknown = httpx.post(server.url + "/v2/models/nope/infer", json=BODY, headers=auth)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    assert unknown.headers["x-content-type-options"] == "nosniff"
    broken = httpx.post(server.url + "/v2/models/digits/infer", content=b"{", headers=auth)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    anonymous = httpx.post(server.url + "/v2/models/digits/infer", json=BODY)
    assert anonymous.status_code == 401 and "www-authenticate" in anonymous.headers
    wrong_method = httpx.get(server.url + "/v2/models/digits/infer", headers=auth)
    assert wrong_method.status_code == 405  # not an inference: the router answers it


def test_a_token_without_the_infer_scope_gets_403_and_an_audit_row(
    secured: tuple[RunningServer, Path],
) -> None:
    server, state_dir = secured
    reply = httpx.post(
        server.url + "/v2/models/digits/infer",
        json=BODY,
        headers=bearer(state_dir, "read", subject="reader"),
    )
    assert reply.status_code == 403
    assert "insufficient_scope" in reply.headers["www-authenticate"]
    admin = bearer(state_dir, "admin")["Authorization"].removeprefix("Bearer ")

    def denied(entries: list[dict]) -> list[dict]:
        return [e for e in entries if e["action"] == "auth.forbidden" and e["subject"] == "reader"]

    entries = wait_for(server, admin, lambda es: bool(denied(es)))
    assert denied(entries), entries
    assert denied(entries)[0]["target"] == "/v2/models/digits/infer"
    assert denied(entries)[0]["detail"]["scope"] == "infer"


def test_with_cors_configured_an_answer_carries_the_cors_headers(tmp_path: Path) -> None:
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\nstate_dir = "{tmp_path / "state"}"\n'
        f'cors_origins = ["{ORIGIN}"]\n[models]\nrepository = "{MODELS}"\nload = ["digits"]\n'
        "[auth]\nenabled = false\n"
    )
    with run_server(tmp_path, config_text=config) as server:
        url = server.url + "/v2/models/digits/infer"
        reply = httpx.post(url, json=BODY, headers={"Origin": ORIGIN})
        assert reply.status_code == 200, reply.text
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert reply.headers["x-frame-options"] == "DENY"
        preflight = httpx.options(
            url,
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        assert "POST" in preflight.headers["access-control-allow-methods"]
        stranger = httpx.post(url, json=BODY, headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in stranger.headers
