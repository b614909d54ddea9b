"""WebSocket streaming: in-order results over one connection, bounded memory for slow readers."""

from __future__ import annotations

import array
import fcntl
import json
import socket
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from tests.serving import RunningServer, run_server
from tests.test_batch_support import digits_rows, model_repository, server_config, v2_request
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits without the queue's wait estimate: these tests are about order and flow
    control, and on a loaded box the estimate rightly refuses a stream's first messages
    (429, retry later) while the first batch is slow to start. The stream's window (16)
    stays far below the queue's size (256), so nothing else can refuse."""
    repo = model_repository(tmp_path_factory.mktemp("repo"))
    toml = repo / "digits" / "model.toml"
    text = toml.read_text()
    assert "[batching]\n" in text
    toml.write_text(text.replace("[batching]\n", "[batching]\nmax_queue_wait_ms = 0.0\n", 1))
    return repo


@pytest.fixture(scope="module", params=["uvicorn", "hypercorn"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, repo: Path
) -> Iterator[RunningServer]:
    """Both HTTP engines: their WebSocket flow control differs underneath."""
    config = server_config(
        repo,
        "[jobs]\nstream_send_timeout_s = 2.0\n",
        server=f'engine = "{request.param}"\ngraceful_timeout_s = 2.0\n',
    )
    with run_server(tmp_path_factory.mktemp("srv"), config_text=config) as s:
        yield s


def ws_url(server: RunningServer, model: str = "digits") -> str:
    return server.url.replace("http://", "ws://") + f"/api/stream/{model}"


def message(x: np.ndarray, i: int) -> str:
    row = x[i % len(x)][None, :]
    return json.dumps({**v2_request(row, ["label"]), "id": str(i)})


def test_ten_thousand_inputs_come_back_in_order_over_one_connection(
    server: RunningServer, repo: Path
) -> None:
    from edgeserve.offline.model import load_model

    x, _ = digits_rows()
    count = 10_000
    expected = load_model(repo, "digits").runtime.run({"input": x}, ["label"])["label"]
    with connect(ws_url(server), max_size=2**20) as ws:
        sender = threading.Thread(target=lambda: [ws.send(message(x, i)) for i in range(count)])
        sender.start()
        replies = [json.loads(ws.recv(timeout=30)) for _ in range(count)]
        sender.join()
    assert [r["id"] for r in replies] == [str(i) for i in range(count)]
    labels = np.array([r["outputs"][0]["data"][0] for r in replies])
    assert np.array_equal(labels, expected[np.arange(count) % len(x)])


def test_a_bad_message_gets_an_error_in_its_place_and_the_stream_goes_on(
    server: RunningServer,
) -> None:
    x, _ = digits_rows()
    with connect(ws_url(server)) as ws:
        ws.send(message(x, 0))
        ws.send("{not json")
        ws.send(
            json.dumps(
                {
                    "id": "7",
                    "inputs": [
                        {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}
                    ],
                }
            )
        )
        ws.send(message(x, 1))
        replies = [json.loads(ws.recv(timeout=10)) for _ in range(4)]
    assert replies[0]["id"] == "0" and "outputs" in replies[0]
    assert "not valid JSON" in replies[1]["error"]
    assert replies[2]["id"] == "7" and "shape" in replies[2]["error"]
    assert replies[3]["id"] == "1"


def test_an_unknown_model_is_refused_at_the_handshake(server: RunningServer) -> None:
    with pytest.raises(InvalidStatus) as refused, connect(ws_url(server, "nope")):
        pass
    assert refused.value.response.status_code == 403


def _open_raw(server: RunningServer) -> tuple[socket.socket, WSConnection]:
    """A WebSocket client that never reads unless told to: a real slow reader."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="127.0.0.1", target="/api/stream/digits")))
    while True:
        ws.receive_data(sock.recv(65536))
        if any(isinstance(e, AcceptConnection) for e in ws.events()):
            return sock, ws


@pytest.mark.slow
def test_a_slow_reader_stalls_its_own_stream_instead_of_growing_server_memory(
    server: RunningServer,
) -> None:
    x, _ = digits_rows()
    process = psutil.Process(server.process.pid)
    sock, ws = _open_raw(server)
    # 64 images per message: ~25 kB in, ~4 kB of probabilities out, so socket buffers
    # fill after a few hundred messages rather than tens of thousands
    request = {**v2_request(x[:64], ["probabilities", "label"]), "id": "batch"}
    frame = ws.send(TextMessage(data=json.dumps(request)))
    total = 40_000  # ~1 GB of requests if nothing pushed back
    sock.settimeout(1.0)
    baseline = process.memory_info().rss
    sent = 0
    try:
        for sent in range(total):  # noqa: B007 - count is the result
            sock.sendall(frame)
    except TimeoutError:
        pass  # the server stopped reading us: that is the backpressure
    peak = process.memory_info().rss
    for _ in range(10):  # a little longer: memory must not keep climbing
        time.sleep(0.1)
        peak = max(peak, process.memory_info().rss)
    sock.close()
    grown_mib = (peak - baseline) / 2**20
    print(
        f"slow reader: sent {sent} of {total} frames before blocking; "
        f"server RSS grew {grown_mib:.1f} MiB"
    )
    assert sent < total / 2, "the server kept reading a client that does not read"
    assert grown_mib < 64


def test_a_reader_that_pauses_then_resumes_still_gets_every_result_in_order(
    server: RunningServer,
) -> None:
    x, _ = digits_rows()
    sock, ws = _open_raw(server)
    count = 3000
    frames = [ws.send(TextMessage(data=message(x, i))) for i in range(count)]
    sender = threading.Thread(target=lambda: [sock.sendall(f) for f in frames])
    sender.start()
    # Not reading: results pile up unread (64 KiB is about a hundred of them, several
    # windows' worth) before the reader resumes.
    _wait_unread(sock, 64 * 1024)
    ids: list[str] = []
    buffer = ""
    sock.settimeout(60)
    while len(ids) < count:
        ws.receive_data(sock.recv(1 << 16))
        for event in ws.events():
            if isinstance(event, TextMessage):
                buffer += event.data
                if event.message_finished:
                    ids.append(json.loads(buffer)["id"])
                    buffer = ""
    sender.join(60)
    sock.close()
    assert ids == [str(i) for i in range(count)]


def _wait_unread(sock: socket.socket, size: int, timeout_s: float = 60) -> None:
    """Wait until at least `size` bytes have arrived on `sock` and are not yet read."""
    wait_until(
        lambda: _unread(sock) >= size,
        timeout_s,
        lambda: f"{size} unread bytes (only {_unread(sock)} arrived)",
        interval_s=0.01,
    )


def _unread(sock: socket.socket) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]
