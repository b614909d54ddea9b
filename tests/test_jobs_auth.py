"""Jobs and streaming are authenticated like everything else: scopes, and owners' jobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from edgeserve.auth import issuer
from tests.serving import RunningServer, run_server
from tests.test_batch_support import digits_rows, model_repository, v2_request

pytestmark = pytest.mark.slow

JSONL = {"content-type": "application/x-ndjson"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("secured")
    repo = model_repository(root)
    data = root / "data"
    data.mkdir()
    issuer.init_keys(root / "state")
    config = (
        '[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "state"\n'
        f'[models]\nrepository = "{repo}"\nbackend = "onnxruntime"\n'
        "[auth]\nfailed_auth_burst = 0\n"
        f'[jobs]\ninput_dirs = ["{data}"]\n'
    )
    with run_server(root, config_text=config) as server:
        yield server, root


def token(root: Path, *scopes: str, subject: str = "alice") -> dict[str, str]:
    value = issuer.create_token(
        root / "state", scopes, 300, subject, "edgeserve-local", "edgeserve"
    )
    return {"Authorization": f"Bearer {value}"}


def body() -> bytes:
    x, _ = digits_rows()
    return "".join(json.dumps({"input": r.tolist()}) + "\n" for r in x[:10]).encode()


def test_jobs_need_the_infer_scope(secured: tuple[RunningServer, Path]) -> None:
    server, root = secured
    url = f"{server.url}/api/jobs?model=digits"
    assert httpx.post(url, content=body(), headers=JSONL).status_code == 401
    assert (
        httpx.post(url, content=body(), headers={**JSONL, **token(root, "read")}).status_code == 403
    )
    assert (
        httpx.post(url, content=body(), headers={**JSONL, **token(root, "infer")}).status_code
        == 202
    )


def test_a_caller_sees_only_its_own_jobs_unless_admin(secured: tuple[RunningServer, Path]) -> None:
    server, root = secured
    alice = token(root, "infer")
    created = httpx.post(
        f"{server.url}/api/jobs?model=digits", content=body(), headers={**JSONL, **alice}
    ).json()
    path = f"{server.url}/api/jobs/{created['id']}"
    assert httpx.get(path, headers=alice).status_code == 200
    assert httpx.get(path, headers=token(root, "infer", subject="bob")).status_code == 404
    assert httpx.delete(path, headers=token(root, "infer", subject="bob")).status_code == 404
    assert httpx.get(path, headers=token(root, "infer", "admin", subject="ops")).status_code == 200
    listed = httpx.get(f"{server.url}/api/jobs", headers=token(root, "infer", subject="bob"))
    assert created["id"] not in {j["id"] for j in listed.json()["jobs"]}


def test_reading_a_server_path_needs_admin(secured: tuple[RunningServer, Path]) -> None:
    server, root = secured
    source = root / "data" / "in.jsonl"
    source.write_bytes(body())
    spec = {"model": "digits", "path": str(source)}
    url = f"{server.url}/api/jobs"
    assert httpx.post(url, json=spec, headers=token(root, "infer")).status_code == 403
    assert httpx.post(url, json=spec, headers=token(root, "infer", "admin")).status_code == 202


def test_streams_need_a_token_with_the_infer_scope(secured: tuple[RunningServer, Path]) -> None:
    server, root = secured
    url = server.url.replace("http://", "ws://") + "/api/stream/digits"
    for headers in ({}, token(root, "read")):
        with pytest.raises(InvalidStatus) as refused, connect(url, additional_headers=headers):
            pass
        assert refused.value.response.status_code == 403
    x, _ = digits_rows()
    with connect(url, additional_headers=token(root, "infer")) as ws:
        ws.send(json.dumps(v2_request(x[:1], ["label"])))
        assert "outputs" in json.loads(ws.recv(timeout=10))
