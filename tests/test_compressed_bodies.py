"""`[limits] accept_compressed = true` (issue 18): gzip and deflate request bodies are
decompressed within `max_body_bytes` and a bounded ratio, so a small compressed body
cannot make the server inflate megabytes (a ratio bomb is 413, counted)."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving import RunningServer, run_server

pytestmark = pytest.mark.slow

ROW = [float(i % 17) for i in range(64)]
INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    extra = (
        "[auth]\nenabled = false\n[limits]\naccept_compressed = true\nmax_body_bytes = 1048576\n"
    )
    with run_server(tmp_path_factory.mktemp("gz"), extra) as s:
        yield s


def _body(rows: int = 1) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": ROW * rows}
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("x-gzip", gzip.compress)],
)
def test_a_compressed_body_is_served(server: RunningServer, encoding: str, compress) -> None:
    reply = httpx.post(
        server.url + INFER,
        content=compress(_body(4)),
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["shape"][0] == 4


def test_a_ratio_bomb_is_refused_before_it_is_inflated(server: RunningServer) -> None:
    # 1 MiB of spaces after the JSON: a few KiB on the wire, far past the ratio bound
    bomb = gzip.compress(_body() + b" " * (1024 * 1024 - 1000))
    assert len(bomb) < 8192
    reply = httpx.post(server.url + INFER, content=bomb, headers={"content-encoding": "gzip"})
    assert reply.status_code == 413
    assert "compress" in reply.json()["error"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'edgeserve_bounds_hit_total{bound="decompressed_body"}' in metrics


def test_a_body_that_inflates_past_the_limit_is_refused(server: RunningServer) -> None:
    # varied numbers compress about 2-3x: under the ratio bound, over max_body_bytes
    data = np.random.default_rng(5).random(1800 * 64).round(6).tolist()
    tensor = {"name": "input", "datatype": "FP32", "shape": [1800, 64], "data": data}
    big = json.dumps({"inputs": [tensor]}).encode()
    packed = gzip.compress(big)
    assert len(big) > 1048576 > len(packed) and len(big) < 50 * len(packed)
    reply = httpx.post(server.url + INFER, content=packed, headers={"content-encoding": "gzip"})
    assert reply.status_code == 413
    assert "exceeds the limit of 1048576 bytes" in reply.json()["error"]


@pytest.mark.parametrize(
    ("body", "encoding", "status"),
    [
        (gzip.compress(b'{"inputs": []}')[:-12], "gzip", 400),  # cut short
        (b"not gzip at all", "gzip", 400),
        (gzip.compress(b"{}"), "br", 415),
    ],
    ids=["truncated", "garbage", "brotli"],
)
def test_broken_compressed_bodies_are_refused(
    server: RunningServer, body: bytes, encoding: str, status: int
) -> None:
    reply = httpx.post(server.url + INFER, content=body, headers={"content-encoding": encoding})
    assert reply.status_code == status, reply.text
    assert "Traceback" not in reply.text


def test_compressed_bodies_stay_refused_by_default(tmp_path: Path) -> None:
    with run_server(tmp_path, "[auth]\nenabled = false\n") as srv:
        reply = httpx.post(
            srv.url + INFER, content=gzip.compress(_body()), headers={"content-encoding": "gzip"}
        )
        assert reply.status_code == 415
