"""Uvicorn's request cycle writes a response's head with its first body part
(edgeserve/http/request_cycle.py); on the wire every answer must stay whole and in
order: HEAD answers, pipelined requests, multi-part bodies, keep-alive after each."""

from __future__ import annotations

import json
import socket

import numpy as np

from tests.serving import MODELS, RunningServer

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()
INFER = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}
).encode()


def _connect(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


class _Reader:
    """Whole HTTP/1.1 responses off one socket, by their Content-Length."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def _fill(self) -> None:
        data = self.conn.recv(65536)
        assert data, "the server closed the connection"
        self.buffer += data

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only else int(headers["content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def test_a_head_request_gets_its_headers_and_the_connection_stays_usable(
    server: RunningServer,
) -> None:
    with _connect(server) as conn:
        reader = _Reader(conn)
        conn.sendall(_request("HEAD", "/v2/health/live"))
        status, headers, _ = reader.response(head_only=True)
        assert status == 200
        assert int(headers["content-length"]) == len(b'{"live":true}')
        assert headers["x-content-type-options"] == "nosniff"
        conn.sendall(_request("GET", "/v2/health/live"))
        status, _, body = reader.response()
        assert status == 200 and json.loads(body) == {"live": True}
        assert reader.buffer == b""  # the HEAD answer carried no body bytes


def test_pipelined_requests_are_answered_whole_and_in_order(server: RunningServer) -> None:
    with _connect(server) as conn:
        reader = _Reader(conn)
        conn.sendall(
            _request("POST", "/v2/models/digits/infer", INFER)
            + _request("GET", "/v2/health/live")
            + _request("POST", "/v2/models/nope/infer", INFER)
            + _request("POST", "/v2/models/digits/infer", INFER)
        )
        answers = [reader.response() for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 404, 200]
    assert json.loads(answers[0][2])["model_name"] == "digits"
    assert json.loads(answers[1][2]) == {"live": True}
    assert "nope" in json.loads(answers[2][2])["error"]
    assert json.loads(answers[3][2])["model_name"] == "digits"


def test_a_file_answer_arrives_whole_with_its_length(server: RunningServer) -> None:
    with _connect(server) as conn:
        reader = _Reader(conn)
        conn.sendall(_request("GET", "/dashboard/static/dashboard.css"))
        status, headers, body = reader.response()
        assert status == 200 and headers["content-type"].startswith("text/css")
        assert len(body) == int(headers["content-length"]) > 0
        conn.sendall(_request("GET", "/v2/health/live"))
        assert reader.response()[0] == 200
