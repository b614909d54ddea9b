"""`[limits] max_json_depth` (16) through the real server: a request nested deeper is a
400 naming the limit; a usual request, which opens only a handful of brackets, is never
walked for its depth (edgeserve/protocol/codec.py) and is answered."""

from __future__ import annotations

import httpx
import pytest

from tests.serving import RunningServer

ROW = [0.0] * 64


def _request(parameters: object) -> dict:
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}],
        "parameters": {"note": parameters},
    }


def _nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(("levels", "status"), [(14, 200), (15, 400), (200, 400)])
def test_nesting_beyond_the_limit_is_refused_and_within_it_answered(
    server: RunningServer, levels: int, status: int
) -> None:
    # the root object and "parameters" are two levels: 14 lists make 16
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=_request(_nested(levels)))
    assert reply.status_code == status, reply.text
    if status == 400:
        assert "nested deeper than 16 levels" in reply.json()["error"]


def test_brackets_inside_strings_do_not_make_a_request_deep(server: RunningServer) -> None:
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=_request("[" * 100))
    assert reply.status_code == 200, reply.text


LARGE = "x" * 64 * 1024  # a body past the size that is walked instead of counted


@pytest.mark.parametrize(("levels", "status"), [(13, 200), (14, 400)])
def test_a_large_request_is_walked_for_its_depth(
    server: RunningServer, levels: int, status: int
) -> None:
    # "parameters", its "note" object and 13 lists make 16
    note = {"pad": LARGE, "deep": _nested(levels)}
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=_request(note))
    assert reply.status_code == status, reply.text
    if status == 400:
        assert "nested deeper than 16 levels" in reply.json()["error"]


def test_a_large_request_nested_too_deep_in_its_tensor_data_is_refused(
    server: RunningServer,
) -> None:
    # 1,024 rows of one value: the root, "inputs", the input, the rows and 13 more lists
    rows = [[0.0]] * 1023 + [_nested(13)]
    request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1024, 1], "data": rows}]}
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=request)
    assert reply.status_code == 400, reply.text
    assert "nested deeper than 16 levels" in reply.json()["error"]
