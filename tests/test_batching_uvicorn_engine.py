"""`[server] engine = "uvicorn"`: the same app and batcher behind Uvicorn + httptools, with
Hypercorn's defences kept (header cap -> 431, slow clients cut off) and a clean SIGTERM."""

from __future__ import annotations

import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving import RunningServer, run_server
from tests.test_batching_server import WEIGHTS, WIDTH, body, write_repository
from tests.test_exhaustion_http import bounds_hit
from tests.waiting import wait_until


def uvicorn_config(folder: Path, repo: Path) -> str:
    return (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\nengine = "uvicorn"\n'
        f'read_timeout_s = 1.0\nstate_dir = "{folder / "state"}"\n'
        f'[models]\nrepository = "{repo}"\n[auth]\nenabled = false\n'
        "[limits]\nmax_header_bytes = 4096\n"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("uvicorn")
    repo = write_repository(
        folder / "repo", {"linear": 'backend = "onnxruntime"\nmax_batch_size = 8\n'}
    )
    with run_server(folder, config_text=uvicorn_config(folder, repo)) as running:
        yield running


def test_infer_works_and_batches(server: RunningServer) -> None:
    rows = np.random.default_rng(5).normal(size=(2, WIDTH)).astype(np.float32)
    reply = httpx.post(f"{server.url}/v2/models/linear/infer", json=body(rows), timeout=10)
    assert reply.status_code == 200, reply.text
    scores = next(o for o in reply.json()["outputs"] if o["name"] == "scores")["data"]
    np.testing.assert_allclose(np.reshape(scores, (2, -1)), rows @ WEIGHTS, rtol=1e-4, atol=1e-4)
    assert "server" not in reply.headers


def test_oversized_headers_get_431(server: RunningServer) -> None:
    reply = httpx.get(f"{server.url}/v2/health/live", headers={"x-pad": "a" * 8000}, timeout=10)
    assert reply.status_code == 431


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /v2/health/live?q=" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"431"),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nx-pad: " + b"a" * 5000 + b"\r\n\r\n", b"431"),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", b"400"),
    ],
    ids=["long url", "long header", "malformed header"],
)
def test_a_bad_request_head_is_refused_by_the_parser_and_the_connection_closed(
    server: RunningServer, head: bytes, status: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        reply = b""
        while chunk := sock.recv(65536):  # read until the server closes
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 " + status + b" "), reply[:80]


def test_a_head_still_arriving_is_refused_once_over_the_cap(server: RunningServer) -> None:
    # Headers sent in several writes and never ended by the blank line: the cap holds
    # for what has arrived of a head, not only for a complete one. Only the fourth write
    # takes the head over the cap (4,096 bytes), so the server has read all that was
    # sent when it answers and closes.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        for i in range(4):  # ~1,050 bytes each
            pad = b"".join(b"x-pad-%d-%d: %s\r\n" % (i, j, b"a" * 90) for j in range(10))
            sock.sendall(pad + b"x")  # the parser passes a header on once the next begins
        reply = b""
        while chunk := sock.recv(65536):  # read until the server closes
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]


def test_one_header_value_trickled_past_the_cap_is_refused(server: RunningServer) -> None:
    # The parser passes a header on only when the next one begins, and holds the value
    # it is reading meanwhile: one endless value must still be held to the cap (4,096
    # bytes here), or a client could grow the server's memory for the head timeout. The
    # 431 may not reach a client still sending (the server's close resets the
    # connection), so what is checked is the refusal's count.
    _send_without_end_and_wait_for_the_refusal(
        server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nx-pad: "
    )


def _send_without_end_and_wait_for_the_refusal(server: RunningServer, start: bytes) -> None:
    """Send `start`, then 2 MB of one value with no end (256 x 8 KiB, each write past
    the cap by itself), and wait for the header-cap refusal's count to grow by one."""
    refused = bounds_hit(server, "header_bytes")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        try:
            sock.sendall(start)
            for _ in range(256):
                sock.sendall(b"a" * 8192)
            while sock.recv(65536):  # read until the server closes
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while we were still sending
    wait_until(lambda: bounds_hit(server, "header_bytes") == refused + 1, 30, "the refusal")


def test_trailers_of_a_chunked_body_count_against_the_header_cap(
    server: RunningServer,
) -> None:
    # Trailer fields come after the body, through the parser's header callback, and are
    # held with the request's headers: the same cap bounds them (431). `Expect:
    # 100-continue` makes the server start the request (and pass its head checks) before
    # the body and trailers are sent, as a slow client's would arrive.
    rows = np.zeros((1, WIDTH), dtype=np.float32)
    payload = httpx.Request("POST", "/", json=body(rows)).content
    trailers = b"".join(b"x-trailer-%d: %s\r\n" % (i, b"a" * 500) for i in range(20))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 "), interim[:80]
        sock.sendall(b"%x\r\n%s\r\n0\r\n" % (len(payload), payload) + trailers + b"\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # read until the server closes
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]


def test_one_trailer_value_sent_without_end_is_refused_past_the_cap(
    server: RunningServer,
) -> None:
    # After a chunked body's last chunk, the parser holds the trailer field it is reading
    # (as a head's header) until the field's CRLF: an endless value is in no field yet,
    # and must still be held to the cap (4,096 bytes here), or a client could grow the
    # server's memory for as long as it keeps sending. As for the head, the 431 may not
    # reach a client still sending, so the refusal's count is what is checked.
    rows = np.zeros((1, WIDTH), dtype=np.float32)
    payload = httpx.Request("POST", "/", json=body(rows)).content
    _send_without_end_and_wait_for_the_refusal(
        server,
        b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\nx-t: " % (len(payload), payload),
    )


def test_a_chunk_whose_size_ends_a_read_is_body_not_trailers(server: RunningServer) -> None:
    # The parser reports a chunk's size line without its size, so after a read that ends
    # with one, the server cannot yet tell the last chunk (trailers follow) from one with
    # data. Here the size line comes in the head's read (the 100 interim answer shows
    # that read is done) and its 1 MB of data in later reads (a read takes 256 KiB at
    # most): body, not trailer bytes past the header cap. The trailer comes after it.
    rows = np.random.default_rng(6).normal(size=(1, WIDTH)).astype(np.float32)
    payload = httpx.Request("POST", "/", json=body(rows)).content + b" " * 1_000_000
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Expect: 100-continue\r\n\r\n%x\r\n" % len(payload)
        )
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 "), interim[:80]
        sock.sendall(payload + b"\r\n0\r\n")
        sock.sendall(b"x-t: 1\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]


def test_slow_client_is_disconnected(server: RunningServer) -> None:
    # The socket's timeout is a deadline for a hang (recv raises), not a speed bound.
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # never finishes
        assert sock.recv(1024) == b""  # closed by the server


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    repo = write_repository(
        tmp_path / "repo", {"linear": 'backend = "onnxruntime"\nmax_batch_size = 8\n'}
    )
    with run_server(tmp_path, config_text=uvicorn_config(tmp_path, repo)) as running:
        running.process.send_signal(signal.SIGHUP)  # reload keeps serving
        assert httpx.get(f"{running.url}/v2/health/ready", timeout=10).status_code == 200
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(30) == 0


@pytest.mark.parametrize("engine", ["hypercorn", "uvicorn"])
def test_tls_serves_inference_on_either_engine(tmp_path: Path, engine: str) -> None:
    from edgeserve.auth.tls import create_self_signed

    files = create_self_signed(tmp_path / "state")
    repo = write_repository(
        tmp_path / "repo", {"linear": 'backend = "onnxruntime"\nmax_batch_size = 8\n'}
    )
    config = uvicorn_config(tmp_path, repo).replace(
        'engine = "uvicorn"\n',
        f'engine = "{engine}"\ntls_cert = "{files.cert}"\ntls_key = "{files.key}"\n',
    )
    trust = ssl.create_default_context(cafile=str(files.cert))
    with run_server(tmp_path, config_text=config, wait_ready=False) as running:
        url = running.url.replace("http://", "https://")

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/v2/health/ready", verify=trust).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 60, lambda: f"the server to be ready:\n{running.log()}")
        rows = np.ones((1, WIDTH), np.float32)
        reply = httpx.post(f"{url}/v2/models/linear/infer", json=body(rows), verify=trust)
        assert reply.status_code == 200, reply.text
        with pytest.raises(httpx.TransportError):  # plaintext is not served on a TLS port
            httpx.get(f"{running.url}/v2/health/live", timeout=5)


def test_the_date_header_moves_on_a_kept_alive_connection(server: RunningServer) -> None:
    # uvicorn renews its Date header each second; every answer on one connection (the
    # direct inference's and the ASGI way's alike) must carry the current one.
    rows = np.zeros((1, WIDTH), dtype=np.float32)
    with httpx.Client(base_url=server.url, timeout=30) as client:  # one kept-alive connection
        first = client.post("/v2/models/linear/infer", json=body(rows)).headers["date"]

        def moved() -> bool:
            infer = client.post("/v2/models/linear/infer", json=body(rows)).headers["date"]
            live = client.get("/v2/health/live").headers["date"]
            return infer != first and live != first

        wait_until(moved, 30, "a Date header newer than the connection's first answer")
