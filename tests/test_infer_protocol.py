"""An inference whose body has arrived with its head is answered by uvicorn's protocol
without ASGI (edgeserve/http/request_cycle.py); one whose body is still to come takes the
ASGI way. Both write what `routes.answer_infer` says, so on the wire they must agree:
status, headers and body, for answers and for error documents alike."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeserve.auth.issuer import create_token, init_keys
from tests.serving import MODELS, RunningServer, run_server

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()
INFER = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}
).encode()
# Values that differ between any two requests, whichever way they are answered.
PER_REQUEST = {"date", "x-request-id", "x-telemetry-seq"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    tmp = tmp_path_factory.mktemp("protocol")
    init_keys(tmp / "state")
    with run_server(tmp, "[auth]\nenabled = true\n") as running:
        yield running, tmp / "state"


def _token(state_dir: Path, scope: str) -> str:
    return create_token(state_dir, [scope], 300, "till", "edgeserve-local", "edgeserve")


class _Reader:
    """Whole HTTP/1.1 responses off one socket, by their Content-Length."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def _fill(self) -> None:
        data = self.conn.recv(65536)
        assert data, "the server closed the connection"
        self.buffer += data

    def closed(self) -> bool:
        return self.buffer == b"" and self.conn.recv(1) == b""


def _head(path: str, body: bytes, token: str | None, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n{extra}"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    return head.encode() + b"\r\n"


def _body_with_head(
    server: RunningServer, path: str, body: bytes, token: str | None
) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(_head(path, body, token) + body)
        return _Reader(conn).response()


def _body_after_continue(
    server: RunningServer, path: str, body: bytes, token: str | None
) -> tuple[int, dict[str, str], bytes]:
    """The body is sent only once the server asked for it: it cannot be there when the
    request's task starts, so the answer takes the ASGI way."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(_head(path, body, token, "Expect: 100-continue\r\n"))
        reader = _Reader(conn)
        status, headers, answer = reader.response()
        if status != 100:  # answered before the body was read (auth, unknown model)
            return status, headers, answer
        conn.sendall(body)
        return reader.response()


@pytest.mark.parametrize(
    ("path", "scope", "body", "status"),
    [
        ("/v2/models/digits/infer", "infer", INFER, 200),
        ("/v2/models/digits/versions/1/infer", "infer", INFER, 200),
        ("/v2/models/digits/infer", "infer", b"{", 400),
        ("/v2/models/nope/infer", "infer", INFER, 404),
        ("/v2/models/digits/versions/%C2%B2/infer", "infer", INFER, 404),
        ("/v2/models/digits/infer", None, INFER, 401),
        ("/v2/models/digits/infer", "read", INFER, 403),
    ],
)
def test_both_ways_write_the_same_answer(
    secured: tuple[RunningServer, Path], path: str, scope: str | None, body: bytes, status: int
) -> None:
    server, state_dir = secured
    token = _token(state_dir, scope) if scope else None
    fast = _body_with_head(server, path, body, token)
    asgi = _body_after_continue(server, path, body, token)
    assert fast[0] == asgi[0] == status, (fast, asgi)
    assert fast[2] == asgi[2]
    assert {k: v for k, v in fast[1].items() if k not in PER_REQUEST} == {
        k: v for k, v in asgi[1].items() if k not in PER_REQUEST
    }
    assert set(fast[1]) >= {"date", "x-content-type-options", "content-length"}


def test_a_client_asking_to_close_gets_its_answer_then_the_close(
    secured: tuple[RunningServer, Path],
) -> None:
    server, state_dir = secured
    token = _token(state_dir, "infer")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        path = "/v2/models/digits/infer"
        conn.sendall(_head(path, INFER, token, "Connection: close\r\n") + INFER)
        reader = _Reader(conn)
        status, headers, body = reader.response()
        assert status == 200 and json.loads(body)["model_name"] == "digits"
        assert headers["connection"] == "close"
        assert reader.closed()


def test_keep_alive_answers_follow_one_another_on_one_connection(
    secured: tuple[RunningServer, Path],
) -> None:
    server, state_dir = secured
    token = _token(state_dir, "infer")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        reader = _Reader(conn)
        for _ in range(3):
            conn.sendall(_head("/v2/models/digits/infer", INFER, token) + INFER)
            status, headers, _ = reader.response()
            assert status == 200 and "connection" not in headers


def _with_id(request_id: str, body: bytes = INFER) -> bytes:
    doc = json.loads(body)
    doc["id"] = request_id
    return json.dumps(doc).encode()


def test_pipelined_requests_are_answered_in_order_whichever_way_each_is_answered(
    secured: tuple[RunningServer, Path],
) -> None:
    """Five requests in one segment (HTTP/1.1 pipelining): answers, refusals and error
    documents come back in the order asked, each the answer to its own request."""
    server, state_dir = secured
    token = _token(state_dir, "infer")
    asked = [
        ("/v2/models/digits/infer", _with_id("first"), 200),
        ("/v2/models/nope/infer", _with_id("second"), 404),
        ("/v2/models/digits/infer", b"{", 400),
        ("/v2/models/digits/versions/1/infer", _with_id("fourth"), 200),
        ("/v2/models/digits/infer", _with_id("fifth"), 200),
    ]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(b"".join(_head(path, body, token) + body for path, body, _ in asked))
        reader = _Reader(conn)
        answers = [reader.response() for _ in asked]
    assert [status for status, _, _ in answers] == [status for _, _, status in asked]
    ids = [json.loads(body).get("id") for status, _, body in answers if status == 200]
    assert ids == ["first", "fourth", "fifth"]


def test_a_chunked_body_that_arrives_whole_gets_the_same_answer(
    secured: tuple[RunningServer, Path],
) -> None:
    server, state_dir = secured
    token = _token(state_dir, "infer")
    path = "/v2/models/digits/infer"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    half = len(INFER) // 2
    chunks = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (INFER[:half], INFER[half:])
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(head + chunks + b"0\r\n\r\n")
        chunked = _Reader(conn).response()
    whole = _body_with_head(server, path, INFER, token)
    assert chunked[0] == whole[0] == 200
    assert chunked[2] == whole[2]


def test_an_http_1_0_client_gets_its_answer_and_the_connection_closes(
    secured: tuple[RunningServer, Path],
) -> None:
    server, state_dir = secured
    token = _token(state_dir, "infer")
    head = _head("/v2/models/digits/infer", INFER, token).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(head + INFER)
        reader = _Reader(conn)
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["model_name"] == "digits"
        assert reader.closed()


@pytest.mark.parametrize("send", [_body_with_head, _body_after_continue])
def test_header_names_are_read_in_any_case_and_values_without_trailing_whitespace(
    secured: tuple[RunningServer, Path], send: object
) -> None:
    """The parser's header handling (names lower-cased, trailing whitespace off values,
    `Expect: 100-Continue` in any case) is uvicorn's, whichever way the answer is written."""
    server, state_dir = secured
    token = _token(state_dir, "infer")
    head = _head("/v2/models/digits/infer", INFER, token, "X-REQUEST-ID: trailing-ws \t\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        if send is _body_after_continue:
            head = head.replace(b"\r\n\r\n", b"\r\nExpect: 100-Continue\r\n\r\n")
            conn.sendall(head)
            reader = _Reader(conn)
            assert reader.response()[0] == 100
            conn.sendall(INFER)
        else:
            conn.sendall(head + INFER)
            reader = _Reader(conn)
        status, headers, _ = reader.response()
    assert status == 200
    assert headers["x-request-id"] == "trailing-ws"
