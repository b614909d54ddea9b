"""Integers a client writes (versions, query parts, headers, folder names, env values) are
1-18 ASCII digits. `str.isdigit()` says yes to `²`, and `int()` then raises: a 500 with a
traceback, even without a token. Each case goes in through the real way in."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeserve.cli.group import run
from edgeserve.serving.repository import read_model
from tests.serving import MODELS, RunningServer, run_server

ODD_VERSIONS = ["²", "٣", "1²", "9" * 19, "1e3", "-1", "+1"]
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Auth on (the default): the odd versions are sent without a token."""
    with run_server(tmp_path_factory.mktemp("guarded"), "") as running:
        yield running


@pytest.mark.parametrize("version", ODD_VERSIONS)
@pytest.mark.parametrize(
    ("method", "suffix"), [("POST", "/infer"), ("GET", "/ready"), ("GET", ""), ("GET", "/stats")]
)
def test_an_odd_version_is_not_found_never_a_500(
    server: RunningServer, version: str, method: str, suffix: str
) -> None:
    url = f"{server.url}/v2/models/digits/versions/{version}{suffix}"
    response = httpx.request(method, url, json=BODY if method == "POST" else None, timeout=30)
    assert response.status_code in (400, 404), (response.status_code, response.text)
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("version", ODD_VERSIONS)
def test_an_odd_version_without_a_token_is_refused_never_a_500(
    guarded: RunningServer, version: str
) -> None:
    url = f"{guarded.url}/v2/models/digits/versions/{version}/infer"
    response = httpx.post(url, json=BODY, timeout=30)
    assert response.status_code in (400, 401, 404), (response.status_code, response.text)
    assert "Traceback" not in guarded.log()


def test_a_version_folder_named_with_odd_digits_is_not_a_version(tmp_path: Path) -> None:
    """A folder `²` beside `1` and `2` is not a version (int() would raise at start-up)."""
    shutil.copytree(MODELS / "digits", tmp_path / "digits")
    odd = tmp_path / "digits" / "²"
    odd.mkdir()
    shutil.copy(MODELS / "digits" / "1" / "model.onnx", odd / "model.onnx")
    assert read_model(tmp_path / "digits").versions == (1, 2)


@pytest.mark.parametrize("ref", ["digits:²", "digits:٣", "digits:" + "9" * 19, "digits:+1"])
def test_batch_score_refuses_an_odd_version_as_a_usage_error(ref: str, tmp_path: Path) -> None:
    rows = tmp_path / "in.jsonl"
    rows.write_text("")
    argv = ["batch", "score", "--model", ref, "--repository", str(MODELS)]
    code = run([*argv, "--input", str(rows), "--output", str(tmp_path / "out.jsonl")])
    assert code in (1, 2)
