"""What a Triton user's own tools expect, over HTTP and gRPC: statistics perf_analyzer can
read, the classification extension, the binary output extension with tritonclient's
defaults, and only the extensions that work advertised.

One real server on the demo `digits` model (auth off), driven by `tritonclient`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.serving import MODELS, RunningServer, run_server
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

LABELS = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    folder = tmp_path_factory.mktemp("conformance")
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{folder / "state"}"\n'
        f'[models]\nrepository = "{MODELS}"\nload = ["digits"]\n'
        "[auth]\nenabled = false\n"
    )
    with run_server(folder, config_text=config) as running:
        yield running, running.grpc_address()


@pytest.fixture(scope="module")
def http(served: tuple[RunningServer, str]) -> Iterator[thttp.InferenceServerClient]:
    server, _ = served
    with thttp.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        yield client


@pytest.fixture(scope="module")
def grpc(served: tuple[RunningServer, str]) -> Iterator[tgrpc.InferenceServerClient]:
    with tgrpc.InferenceServerClient(served[1]) as client:
        yield client


def pixels(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (rows, 64)).astype(np.float32)


def http_infer(
    client: thttp.InferenceServerClient, rows: np.ndarray, outputs: list | None = None, **kw: Any
) -> thttp.InferResult:
    data = thttp.InferInput("input", list(rows.shape), "FP32")
    data.set_data_from_numpy(rows, binary_data=kw.pop("binary_input", True))
    return client.infer("digits", [data], outputs=outputs, **kw)


def grpc_infer(
    client: tgrpc.InferenceServerClient, rows: np.ndarray, outputs: list | None = None
) -> tgrpc.InferResult:
    data = tgrpc.InferInput("input", list(rows.shape), "FP32")
    data.set_data_from_numpy(rows)
    return client.infer("digits", [data], outputs=outputs)


def post_infer(server: RunningServer, doc: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/digits/infer", json=doc, timeout=30)


def json_request(rows: np.ndarray, **extra: Any) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(rows.shape)}
    doc: dict[str, Any] = {"inputs": [{**tensor, "data": rows.ravel().tolist()}]}
    doc.update(extra)
    return doc


# -- statistics ---------------------------------------------------------------------------


def _http_stats(client: thttp.InferenceServerClient) -> dict:
    [stats] = client.get_inference_statistics("digits", "2")["model_stats"]
    return stats


def _grpc_stats(client: tgrpc.InferenceServerClient) -> dict:
    response = client.get_inference_statistics("digits", "2", as_json=True)
    [stats] = response["model_stats"]
    return stats


def _counts(stats: dict) -> dict[str, int]:
    """Each inference_stats counter's count (gRPC's JSON spells uint64 as a string)."""
    return {k: int(v.get("count", 0)) for k, v in stats["inference_stats"].items()}


def test_statistics_compute_counts_agree_as_perf_analyzer_requires(
    served: tuple[RunningServer, str],
    http: thttp.InferenceServerClient,
    grpc: tgrpc.InferenceServerClient,
) -> None:
    server, _ = served
    before = _counts(_http_stats(http))
    for i in range(3):
        http_infer(http, pixels(1 + i, seed=i))
        grpc_infer(grpc, pixels(2, seed=10 + i))
    assert post_infer(server, json_request(pixels(1)[:, :63])).status_code == 400
    for stats in (_http_stats(http), _grpc_stats(grpc)):
        counts = _counts(stats)
        assert counts["compute_input"] == counts["compute_infer"] == counts["compute_output"]
        assert counts["success"] == counts["queue"] == counts["compute_infer"]
        assert counts["success"] - before["success"] == 6
        assert counts["fail"] - before["fail"] == 1  # the refused shape, not computed
        assert int(stats["inference_count"]) >= 1 + 2 + 3 + 3 * 2
        assert 1 <= int(stats["execution_count"]) <= int(stats["inference_count"])
        assert int(stats["last_inference"]) > 0
        for ns_field in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            assert int(stats["inference_stats"][ns_field]["ns"]) > 0, ns_field
        for batch in stats["batch_stats"]:
            assert (
                int(batch["compute_input"]["count"])
                == int(batch["compute_infer"]["count"])
                == int(batch["compute_output"]["count"])
                > 0
            )


def _perf_analyzer_problem() -> str | None:
    """Why the real perf_analyzer cannot run here (None when it can)."""
    binary = shutil.which("perf_analyzer")
    if binary is None:
        return (
            "perf_analyzer is not installed (pip install perf-analyzer; its wheel needs "
            "glibc >= 2.38)"
        )
    probe = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        first = (probe.stderr or probe.stdout).strip().splitlines()
        return f"perf_analyzer cannot run here: {first[0] if first else probe.returncode}"
    return None


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_completes_its_concurrency_sweep(
    served: tuple[RunningServer, str], protocol: str
) -> None:
    problem = _perf_analyzer_problem()
    if problem is not None:
        pytest.skip(problem)
    server, grpc_url = served
    url = grpc_url if protocol == "grpc" else f"127.0.0.1:{server.port}"
    run = subprocess.run(
        [
            *("perf_analyzer", "-m", "digits", "-i", protocol, "-u", url),
            *("--concurrency-range", "1:8", "--measurement-mode", "count_windows"),
            *("--measurement-request-count", "50", "-s", "50"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Concurrency: 8" in run.stdout


# -- classification -----------------------------------------------------------------------


def _expected_top(probabilities: np.ndarray, k: int) -> list[list[tuple[int, str]]]:
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(int(i), LABELS[i]) for i in row] for row in order]


def _parsed(classes: np.ndarray) -> list[list[tuple[float, int, str]]]:
    rows = []
    for row in classes:
        parsed = []
        for item in row:
            text = item.decode() if isinstance(item, bytes) else str(item)
            score, index, label = text.split(":")
            parsed.append((float(score), int(index), label))
        rows.append(parsed)
    return rows


def _check_top3(classes: np.ndarray, probabilities: np.ndarray) -> None:
    assert classes.shape == (len(probabilities), 3)
    parsed = _parsed(classes)
    assert [[(i, lab) for _, i, lab in row] for row in parsed] == _expected_top(probabilities, 3)
    for row, probs in zip(parsed, probabilities, strict=True):
        for score, index, _ in row:
            assert score == pytest.approx(float(probs[index]), abs=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_class_count_answers_top3_strings(
    http: thttp.InferenceServerClient, binary: bool
) -> None:
    rows = pixels(4, seed=3)
    probabilities = http_infer(http, rows).as_numpy("probabilities")
    out = thttp.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    result = http_infer(http, rows, [out])
    assert result.get_output("probabilities")["datatype"] == "BYTES"
    _check_top3(result.as_numpy("probabilities"), probabilities)


def test_grpc_class_count_answers_top3_strings(grpc: tgrpc.InferenceServerClient) -> None:
    rows = pixels(5, seed=4)
    probabilities = grpc_infer(grpc, rows).as_numpy("probabilities")
    out = tgrpc.InferRequestedOutput("probabilities", class_count=3)
    result = grpc_infer(grpc, rows, [out])
    assert result.get_output("probabilities").datatype == "BYTES"
    _check_top3(result.as_numpy("probabilities"), probabilities)


def test_class_count_beyond_the_classes_gives_every_class(
    served: tuple[RunningServer, str],
) -> None:
    server, _ = served
    out = {"name": "probabilities", "parameters": {"classification": 50}}
    answer = post_infer(server, json_request(pixels(1), outputs=[out]))
    assert answer.status_code == 200, answer.text
    [output] = answer.json()["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 10]


@pytest.mark.parametrize(
    "parameters",
    [
        {"classification": "3"},
        {"classification": 0},
        {"classification": -2},
        {"classification": 1.5},
        {"classification": True},
        {"classification": [3]},
        {"classification": 3, "binary_data": "yes"},
        {"binary_data": 1},
    ],
    ids=["string", "zero", "negative", "float", "bool", "list", "binary-text", "binary-int"],
)
def test_broken_output_parameters_are_a_400(
    served: tuple[RunningServer, str], parameters: dict
) -> None:
    server, _ = served
    out = {"name": "probabilities", "parameters": parameters}
    answer = post_infer(server, json_request(pixels(1), outputs=[out]))
    assert answer.status_code == 400, answer.text
    key = "binary_data" if "binary_data" in parameters else "classification"
    assert key in answer.json()["error"]


def test_grpc_broken_classification_is_invalid_argument(
    grpc: tgrpc.InferenceServerClient,
) -> None:
    data = tgrpc.InferInput("input", [1, 64], "FP32")
    data.set_data_from_numpy(pixels(1))
    out = tgrpc.InferRequestedOutput("probabilities")
    out._output.parameters["classification"].string_param = "three"
    with pytest.raises(InferenceServerException) as refused:
        grpc.infer("digits", [data], outputs=[out])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "classification" in refused.value.message()


# -- binary output extension ---------------------------------------------------------------


def _split(answer: httpx.Response) -> tuple[dict, bytes]:
    length = answer.headers.get("inference-header-content-length")
    if length is None:
        return answer.json(), b""
    return orjson.loads(answer.content[: int(length)]), answer.content[int(length) :]


def _binary_outputs(head: dict) -> set[str]:
    return {o["name"] for o in head["outputs"] if "binary_data_size" in o.get("parameters", {})}


@pytest.mark.parametrize(
    ("extra", "binary"),
    [
        ({}, set()),
        ({"parameters": {"binary_data_output": True}}, {"probabilities", "label"}),
        ({"parameters": {"binary_data_output": False}}, set()),
        (
            {"parameters": {"binary_data_output": True}, "outputs": [{"name": "label"}]},
            {"label"},
        ),
        (
            {
                "parameters": {"binary_data_output": True},
                "outputs": [
                    {"name": "label", "parameters": {"binary_data": False}},
                    {"name": "probabilities"},
                ],
            },
            {"probabilities"},
        ),
        ({"outputs": [{"name": "label", "parameters": {"binary_data": True}}]}, {"label"}),
    ],
    ids=["json", "all-binary", "all-json", "named-inherits", "per-output-wins", "per-output"],
)
def test_binary_data_output_and_binary_data_per_output(
    served: tuple[RunningServer, str], extra: dict, binary: set[str]
) -> None:
    server, _ = served
    rows = pixels(2, seed=7)
    answer = post_infer(server, json_request(rows, **extra))
    assert answer.status_code == 200, answer.text
    head, blob = _split(answer)
    assert _binary_outputs(head) == binary
    assert len(blob) == sum(
        o["parameters"]["binary_data_size"] for o in head["outputs"] if o["name"] in binary
    )


@pytest.mark.parametrize("value", ["true", 1, None, {"x": 1}], ids=["text", "int", "null", "obj"])
def test_broken_binary_data_output_is_a_400(served: tuple[RunningServer, str], value: Any) -> None:
    server, _ = served
    answer = post_infer(server, json_request(pixels(1), parameters={"binary_data_output": value}))
    assert answer.status_code == 400, answer.text
    assert "binary_data_output" in answer.json()["error"]


@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_output", [True, False], ids=["binary-out", "json-out"])
def test_tritonclient_defaults_both_directions(
    http: thttp.InferenceServerClient, binary_input: bool, binary_output: bool
) -> None:
    rows = pixels(3, seed=9)
    out = [
        thttp.InferRequestedOutput("probabilities", binary_data=binary_output),
        thttp.InferRequestedOutput("label", binary_data=binary_output),
    ]
    result = http_infer(http, rows, out, binary_input=binary_input)
    reference = http_infer(http, rows).as_numpy("probabilities")  # tritonclient's defaults
    for name in ("probabilities", "label"):
        params = result.get_output(name).get("parameters", {})
        assert ("binary_data_size" in params) is binary_output
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference, rtol=1e-6)
    assert result.as_numpy("label").tolist() == reference.argmax(axis=1).tolist()


# -- advertised extensions ------------------------------------------------------------------


def test_only_working_extensions_are_advertised(
    http: thttp.InferenceServerClient, grpc: tgrpc.InferenceServerClient
) -> None:
    working = {
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "model_repository",
        "statistics",
    }
    assert set(http.get_server_metadata()["extensions"]) == working
    assert set(grpc.get_server_metadata().extensions) == working


def test_unimplemented_grpc_method_is_one_info_line(
    served: tuple[RunningServer, str], grpc: tgrpc.InferenceServerClient
) -> None:
    server, _ = served
    with pytest.raises(InferenceServerException) as refused:
        grpc.get_system_shared_memory_status()
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
    log = server.log()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "SystemSharedMemoryStatus" in line]
    assert len(lines) == 1 and "level=INFO" in lines[0], lines


def test_unknown_grpc_method_is_unimplemented_with_one_info_line(
    served: tuple[RunningServer, str],
) -> None:
    import grpc as grpc_lib

    server, grpc_url = served
    with grpc_lib.insecure_channel(grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
        with pytest.raises(grpc_lib.RpcError) as refused:
            call(b"", timeout=30)
    assert refused.value.code() == grpc_lib.StatusCode.UNIMPLEMENTED
    log = server.log()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "NoSuchMethod" in line]
    assert len(lines) == 1 and "level=INFO" in lines[0], lines


# -- zero rows, model control, readiness ----------------------------------------------------


@pytest.mark.parametrize(
    "outputs",
    [None, [{"name": "probabilities", "parameters": {"classification": 3}}]],
    ids=["plain", "classification"],
)
def test_zero_row_request_is_a_400_naming_the_input(
    served: tuple[RunningServer, str], outputs: list | None
) -> None:
    """As Triton ("batch-size must be >= 1"): a batch of no rows is the client's mistake.
    Sent twice: the first must not teach the batcher a speed that breaks the second."""
    server, _ = served
    doc = json_request(np.zeros((0, 64), np.float32))
    if outputs is not None:
        doc["outputs"] = outputs
    for _ in range(2):
        answer = post_infer(server, doc)
        assert answer.status_code == 400, answer.text
        assert "'input'" in answer.json()["error"] and "0 rows" in answer.json()["error"]
    assert post_infer(server, json_request(pixels(1))).status_code == 200


def test_grpc_zero_row_request_is_invalid_argument(grpc: tgrpc.InferenceServerClient) -> None:
    data = tgrpc.InferInput("input", [0, 64], "FP32")
    data.set_data_from_numpy(np.zeros((0, 64), np.float32))
    with pytest.raises(InferenceServerException) as refused:
        grpc.infer("digits", [data])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "0 rows" in str(refused.value)


def test_explicit_load_outside_models_load_is_refused_naming_the_setting(
    served: tuple[RunningServer, str],
) -> None:
    """The config says load = ["digits"]: `text` (in the same repository) stays out."""
    server, _ = served
    answer = httpx.post(f"{server.url}/v2/repository/models/text/load", timeout=60)
    assert answer.status_code == 409, answer.text
    assert "models.load" in answer.json()["error"]
    index = httpx.post(f"{server.url}/v2/repository/index", timeout=10).json()
    assert [e["name"] for e in index] == ["digits", "digits"]  # its two versions
    assert httpx.post(f"{server.url}/v2/repository/models/digits/load", timeout=60).is_success


def test_grpc_server_ready_agrees_with_http_when_no_signing_key_is_trusted(
    tmp_path: Path,
) -> None:
    """Every token would be refused: neither transport may report the server ready."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[models]\nrepository = "{MODELS}"\nload = ["digits"]\n'
        f'[auth]\njwks_file = "{jwks}"\n'
    )
    with run_server(tmp_path, config_text=config, wait_ready=False) as server:

        def models_loaded() -> bool:
            log = server.log()
            return all(f"model ready model=digits version={v} " in log for v in (1, 2))

        wait_until(models_loaded, 60, server.log)
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=10)
        assert ready.status_code == 503 and "no token signing key" in ready.json()["error"]
        with tgrpc.InferenceServerClient(server.grpc_address()) as client:
            assert client.is_server_live()
            assert not client.is_server_ready()
