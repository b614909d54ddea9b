"""Streams do not outlive their tokens (issue 18): a WebSocket or gRPC stream stops
answering once its token has expired or its signing key was rotated out, and an idle
WebSocket is closed."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import numpy as np
import pytest
import tritonclient.grpc as triton
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from edgeserve.auth import issuer
from tests.serving import RunningServer, run_server
from tests.test_batching_server import WIDTH, write_repository
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str, Path]]:
    folder = tmp_path_factory.mktemp("stream-sessions")
    state_dir = folder / "state"
    issuer.init_keys(state_dir)
    repo = write_repository(folder / "repo", {"linear": 'backend = "onnxruntime"\n'})
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{state_dir}"\n[models]\nrepository = "{repo}"\n'
        "[auth]\nfailed_auth_burst = 0\nleeway_s = 0\n"
    )
    with run_server(folder, config_text=config) as server:
        yield server, server.grpc_address(), state_dir


def _token(state_dir: Path, ttl_s: int = 300) -> str:
    return issuer.create_token(state_dir, ["infer"], ttl_s, "it", "edgeserve-local", "edgeserve")


def _past_expiry(token: str) -> None:
    """Wait (on the clock, the condition itself) until the token's `exp` has passed."""
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    wait_until(lambda: time.time() >= exp + 0.5, 30, "the token to expire", interval_s=0.1)


def _message(i: int) -> str:
    doc = {
        "id": str(i),
        "inputs": [
            {"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [1.0] * WIDTH}
        ],
    }
    return json.dumps(doc)


def _ws(server: RunningServer, token: str) -> ClientConnection:
    url = server.url.replace("http://", "ws://") + "/api/stream/linear"
    return connect(url, additional_headers={"authorization": f"Bearer {token}"})


def _closed_with(ws: ClientConnection, timeout_s: float = 30) -> int:
    """Send messages until the server closes the stream; its close code."""

    def closed() -> int | None:
        try:
            ws.send(_message(1))
            ws.recv(timeout=5)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else -1
        except TimeoutError:
            pass
        return None

    return wait_until(closed, timeout_s, "the stream to be closed", interval_s=0.1)


def test_a_websocket_stream_stops_answering_once_its_token_expired(
    secured: tuple[RunningServer, str, Path],
) -> None:
    server, _, state_dir = secured
    token = _token(state_dir, ttl_s=3)
    with _ws(server, token) as ws:
        ws.send(_message(0))
        assert "outputs" in json.loads(ws.recv(timeout=30))
        _past_expiry(token)
        assert _closed_with(ws) == 1008


def test_a_websocket_stream_ends_when_its_key_is_rotated_out(
    secured: tuple[RunningServer, str, Path],
) -> None:
    server, _, state_dir = secured
    with _ws(server, _token(state_dir)) as ws:
        ws.send(_message(0))
        assert "outputs" in json.loads(ws.recv(timeout=30))
        issuer.rotate_signing_key(state_dir, keep_previous=0)  # the old key is revoked
        assert _closed_with(ws) == 1008


def _grpc_stream_after(secured: tuple[RunningServer, str, Path], token: str, between) -> str:
    """Infer once on a stream, run `between`, infer again until refused; the refusal."""
    _, grpc_address, _ = secured
    replies: queue.Queue = queue.Queue()
    data = triton.InferInput("input", [1, WIDTH], "FP32")
    data.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
    with triton.InferenceServerClient(grpc_address) as client:
        client.start_stream(
            callback=lambda result, error: replies.put((result, error)),
            headers={"authorization": f"Bearer {token}"},
        )
        try:
            client.async_stream_infer("linear", [data], request_id="0")
            result, error = replies.get(timeout=30)
            assert error is None and result.as_numpy("label").shape == (1,)
            between()

            def refused() -> str | None:
                try:
                    client.async_stream_infer("linear", [data], request_id="1")
                except Exception as exc:  # the stream already ended
                    return str(exc)
                _, error = replies.get(timeout=30)
                return None if error is None else str(error.status())

            return wait_until(refused, 30, "the stream to be refused", interval_s=0.1)
        finally:
            client.stop_stream()


def test_a_grpc_stream_ends_once_its_token_expired(
    secured: tuple[RunningServer, str, Path],
) -> None:
    token = _token(secured[2], ttl_s=3)
    refusal = _grpc_stream_after(secured, token, lambda: _past_expiry(token))
    assert "UNAUTHENTICATED" in refusal


def test_a_grpc_stream_ends_when_its_key_is_rotated_out(
    secured: tuple[RunningServer, str, Path],
) -> None:
    state_dir = secured[2]
    refusal = _grpc_stream_after(
        secured,
        _token(state_dir),
        lambda: issuer.rotate_signing_key(state_dir, keep_previous=0),
    )
    assert "UNAUTHENTICATED" in refusal


def test_an_idle_websocket_is_closed(tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "repo", {"linear": 'backend = "onnxruntime"\n'})
    config = (
        '[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "state"\n'
        f'[models]\nrepository = "{repo}"\n[auth]\nenabled = false\n'
        "[jobs]\nstream_idle_timeout_s = 1.0\n"
    )
    with run_server(tmp_path, config_text=config) as server:
        url = server.url.replace("http://", "ws://") + "/api/stream/linear"
        with connect(url) as ws:
            ws.send(_message(0))
            assert "outputs" in json.loads(ws.recv(timeout=30))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=60)  # nothing sent: the server ends it
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
