"""A gRPC stream client that writes and never reads cannot grow the server's memory.

The attack from issue 18: `ModelStreamInfer`, many requests sent, no reply ever read.
The server must stop reading the stream once its replies are not taken (bounded reply
queue, in-flight slot held until the writer has the reply), so the client's own sends
block on HTTP/2 flow control instead of the server buffering replies without bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.serving import MODELS, run_server

ROWS = 64  # digits' max_batch_size: the largest reply one request can ask for
SEND_FOR_S = 10.0  # how long the client keeps trying to send (a deadline, not an assert)
RSS_BOUND_MIB = 50  # growth allowed while the client sends and never reads


def rss_mib(pid: int) -> float:
    """The process's resident set, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def digits_request() -> pb.ModelInferRequest:
    rows = np.random.default_rng(3).integers(0, 17, size=(ROWS, 64)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="digits", id="never-read")
    request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())
    return request


def test_stream_that_never_reads_keeps_server_memory_bounded(tmp_path: Path) -> None:
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[models]\nrepository = "{MODELS}"\nload = ["digits"]\n[auth]\nenabled = false\n'
    )
    request = digits_request()
    stop = threading.Event()
    sent = [0]

    def requests() -> Iterator[pb.ModelInferRequest]:
        while not stop.is_set():
            sent[0] += 1
            yield request

    with run_server(tmp_path, config_text=config) as server:
        pid = server.process.pid
        with grpc.insecure_channel(server.grpc_address()) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            replies = stub.ModelStreamInfer(requests())  # never iterated: nothing is read
            start_mib = rss_mib(pid)
            peak_mib = start_mib
            deadline = time.monotonic() + SEND_FOR_S
            while time.monotonic() < deadline and peak_mib - start_mib <= RSS_BOUND_MIB:
                peak_mib = max(peak_mib, rss_mib(pid))
                stop.wait(0.2)  # sampling interval of the RSS probe, not synchronisation
            stop.set()
            replies.cancel()
        growth = peak_mib - start_mib
        print(f"sent={sent[0]} rss_start_mib={start_mib:.0f} growth_mib={growth:.0f}")
        assert growth <= RSS_BOUND_MIB, (
            f"server RSS grew {growth:.0f} MiB while a stream client sent {sent[0]} "
            "requests and read nothing"
        )
        assert sent[0] > 64, "the server read no more than one window of the stream"
        # The server still serves after the stalled stream is gone.
        assert httpx.get(server.url + "/v2/health/live", timeout=10).status_code == 200
