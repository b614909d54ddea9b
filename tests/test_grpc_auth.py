"""gRPC calls go through the same authenticator as HTTP: bearer tokens in the
`authorization` metadata, scopes per RPC, health open."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from edgeserve.auth import issuer
from tests.serving import run_server
from tests.test_batching_server import WIDTH, write_repository

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("grpc-auth")
    state_dir = folder / "state"
    issuer.init_keys(state_dir)
    repo = write_repository(
        folder / "repo", {"linear": 'backend = "onnxruntime"\nmax_batch_size = 4\n'}
    )
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{state_dir}"\n[models]\nrepository = "{repo}"\n'
        "[auth]\nfailed_auth_burst = 0\n"
    )
    with run_server(folder, config_text=config) as server:
        yield server.grpc_address(), state_dir


def token_for(state_dir: Path, *scopes: str) -> str:
    return issuer.create_token(state_dir, scopes, 300, "it", "edgeserve-local", "edgeserve")


def call(url: str, token: str | None) -> np.ndarray:
    headers = {"authorization": f"Bearer {token}"} if token else None
    data = triton.InferInput("input", [1, WIDTH], "FP32")
    data.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
    with triton.InferenceServerClient(url) as client:
        return client.infer("linear", [data], headers=headers).as_numpy("label")


def status_of(url: str, token: str | None) -> str:
    with pytest.raises(InferenceServerException) as refused:
        call(url, token)
    return refused.value.status()


def test_health_needs_no_token(secured: tuple[str, Path]) -> None:
    url, _ = secured
    with triton.InferenceServerClient(url) as client:
        assert client.is_server_live()


def test_infer_with_a_token_holding_the_scope(secured: tuple[str, Path]) -> None:
    url, state_dir = secured
    assert call(url, token_for(state_dir, "infer")).shape == (1,)


@pytest.mark.parametrize(
    ("token", "status"),
    [
        (None, "StatusCode.UNAUTHENTICATED"),
        ("not-a-jwt", "StatusCode.UNAUTHENTICATED"),
        ("read-only", "StatusCode.PERMISSION_DENIED"),
    ],
    ids=["missing", "garbage", "wrong-scope"],
)
def test_refusals_map_to_grpc_codes(
    secured: tuple[str, Path], token: str | None, status: str
) -> None:
    url, state_dir = secured
    if token == "read-only":
        token = token_for(state_dir, "read")
    assert status_of(url, token) == status


def test_metadata_needs_read_scope(secured: tuple[str, Path]) -> None:
    url, state_dir = secured
    with triton.InferenceServerClient(url) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_metadata("linear")
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        good = {"authorization": f"Bearer {token_for(state_dir, 'read')}"}
        assert client.get_model_metadata("linear", headers=good).name == "linear"


@pytest.mark.parametrize("scope", [None, "read", "infer"], ids=["missing", "wrong-scope", "ok"])
def test_stream_needs_the_infer_scope(secured: tuple[str, Path], scope: str | None) -> None:
    url, state_dir = secured
    headers = {"authorization": f"Bearer {token_for(state_dir, scope)}"} if scope else None
    replies: queue.Queue = queue.Queue()
    data = triton.InferInput("input", [1, WIDTH], "FP32")
    data.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
    with triton.InferenceServerClient(url) as client:
        client.start_stream(
            callback=lambda result, error: replies.put((result, error)), headers=headers
        )
        try:
            client.async_stream_infer("linear", [data], request_id="a")
        except InferenceServerException:
            # The server may refuse the stream before the request is queued; the client
            # then raises here and reports the refusal through the callback.
            assert scope != "infer"
        result, error = replies.get(timeout=30)
        client.stop_stream()
    if scope == "infer":
        assert error is None and result.as_numpy("label").shape == (1,)
    else:
        expected = "UNAUTHENTICATED" if scope is None else "PERMISSION_DENIED"
        assert result is None and expected in str(error.status())


@pytest.mark.parametrize(
    "value",
    [" Bearer {token}", "Bearer {token} ", "  Bearer {token}  "],
    ids=["perf-analyzer", "trailing", "both"],
)
def test_authorization_metadata_with_surrounding_blanks_is_accepted(
    secured: tuple[str, Path], value: str
) -> None:
    """perf_analyzer's `-H "authorization: Bearer X"` splits at the colon and sends the
    metadata value " Bearer X" (src/command_line_parser.cc, case 'H'); HTTP parsers drop
    such blanks, so gRPC does too."""
    url, state_dir = secured
    metadata = {"authorization": value.format(token=token_for(state_dir, "infer"))}
    data = triton.InferInput("input", [1, WIDTH], "FP32")
    data.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
    with triton.InferenceServerClient(url) as client:
        assert client.infer("linear", [data], headers=metadata).as_numpy("label").shape == (1,)
