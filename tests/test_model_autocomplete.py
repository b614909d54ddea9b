"""A model dropped in just serves: `mymodel/1/model.onnx` without model.toml gets its
configuration from the model file, as Triton's auto-complete does, and a folder that
cannot be served says so in one WARNING line."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as thttp

from tests.serving import MODELS, RunningServer, run_server
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("dropped")
    repo = folder / "repo"
    (repo / "mymodel" / "1").mkdir(parents=True)
    shutil.copy(MODELS / "digits" / "1" / "model.onnx", repo / "mymodel" / "1" / "model.onnx")
    (repo / "notes").mkdir()  # no model.toml, no version folder: cannot be served
    (repo / "notes" / "README.txt").write_text("not a model")
    (repo / "bad name!" / "1").mkdir(parents=True)
    shutil.copy(MODELS / "digits" / "1" / "model.onnx", repo / "bad name!" / "1" / "model.onnx")
    with run_server(folder, "[auth]\nenabled = false\n", repository=repo) as running:
        yield running


def test_bare_model_onnx_serves_without_model_toml(served: RunningServer) -> None:
    with thttp.InferenceServerClient(f"127.0.0.1:{served.port}") as client:
        assert client.is_server_ready()
        rows = np.random.default_rng(0).uniform(0, 16, (3, 64)).astype(np.float32)
        data = thttp.InferInput("input", [3, 64], "FP32")
        data.set_data_from_numpy(rows)
        result = client.infer("mymodel", [data])
        assert result.as_numpy("probabilities").shape == (3, 10)
        assert result.as_numpy("label").shape == (3,)


def test_config_shows_what_was_derived(served: RunningServer) -> None:
    config = httpx.get(f"{served.url}/v2/models/mymodel/config", timeout=10).json()
    assert config["max_batch_size"] == 4  # Triton's default when dim 0 is dynamic
    assert "dynamic_batching" in config
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert {(o["name"], o["data_type"], tuple(o["dims"])) for o in config["output"]} == {
        ("probabilities", "TYPE_FP32", (10,)),
        ("label", "TYPE_INT64", ()),
    }


def test_the_log_says_what_was_derived(served: RunningServer) -> None:
    derived = re.findall(r"model config derived model=mymodel version=1 (.*)", served.log())
    assert derived == [
        "max_batch_size=4 inputs=input:FP32[-1,64] "
        "outputs=probabilities:FP32[-1,10],label:INT64[-1]"
    ], served.log()


@pytest.mark.parametrize(
    ("folder", "reason"),
    [("notes", "no model.toml"), ("bad name!", "letters, digits")],
)
def test_unservable_folder_is_one_warning_naming_folder_and_reason(
    served: RunningServer, folder: str, reason: str
) -> None:
    lines = [
        line
        for line in served.log().splitlines()
        if "level=WARNING" in line and f"/{folder}" in line
    ]
    assert len(lines) == 1, served.log()
    assert reason in lines[0]


def test_broken_bare_model_does_not_stop_the_others(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    shutil.copytree(MODELS / "digits", repo / "digits")
    with run_server(tmp_path, "[auth]\nenabled = false\n", repository=repo, wait_ready=False) as s:
        wait_until(lambda: "model load failed model=broken" in s.log(), 60, s.log)
        index = httpx.post(f"{s.url}/v2/repository/index", timeout=10).json()
        broken = [e for e in index if e["name"] == "broken"]
        assert broken and broken[0]["state"] == "UNAVAILABLE" and broken[0]["reason"]


def test_broken_bare_model_does_not_keep_the_server_unready(tmp_path: Path) -> None:
    """A file dropped in is no promise: the others serve, and the server is ready for them,
    also after an explicit load of the broken one fails again."""
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    shutil.copytree(MODELS / "digits", repo / "digits")
    with run_server(tmp_path, "[auth]\nenabled = false\n", repository=repo, wait_ready=False) as s:

        def settled() -> bool:  # every version has finished loading, one way or the other
            try:
                index = httpx.post(f"{s.url}/v2/repository/index", timeout=10).json()
            except httpx.TransportError:  # not listening yet
                return False
            return len(index) == 3 and all(e["state"] != "LOADING" for e in index)

        wait_until(settled, 60, s.log)
        assert httpx.get(f"{s.url}/v2/health/ready", timeout=10).status_code == 200
        assert _infer_digits(s) == 200
        for action, status in (("unload", 200), ("load", 503), ("load", 503)):
            url = f"{s.url}/v2/repository/models/broken/{action}"
            assert httpx.post(url, timeout=60).status_code == status
            assert httpx.get(f"{s.url}/v2/health/ready", timeout=10).status_code == 200, action
        assert _infer_digits(s) == 200


def _infer_digits(server: RunningServer) -> int:
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}
    return httpx.post(f"{server.url}/v2/models/digits/infer", json=doc, timeout=30).status_code
