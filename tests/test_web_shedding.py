"""The shedding middleware: a full model answers 429 before routing, auth or the body
read; anything it is not sure about goes on to the endpoint, which answers properly."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from edgeserve.errors import ModelNotFound
from edgeserve.http.shedding import ShedMiddleware
from edgeserve.serving import admission as loop_lag
from edgeserve.serving.admission import LagShedder
from tests.serving import run_server
from tests.waiting import wait_until

# One digits row as JSON, and the keep-alive HTTP/1.1 request carrying it.
DIGITS_BODY = (
    b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [%s]}]}'
    % b",".join([b"1"] * 64)
)
DIGITS_REQUEST = (
    b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(DIGITS_BODY)).encode() + b"\r\n\r\n" + DIGITS_BODY
)


class FakeRegistry:
    def __init__(self) -> None:
        self.full: dict[tuple[str, str | None], bool] = {}

    def get(self, name: str, version: str | None = None) -> SimpleNamespace:
        if (name, version) not in self.full:
            raise ModelNotFound(f"unknown model '{name}'")
        return SimpleNamespace(scheduler=SimpleNamespace(full=self.full[(name, version)]))


@pytest.fixture
def app() -> tuple[TestClient, FakeRegistry, list[str]]:
    reached: list[str] = []

    async def endpoint(request: Request) -> JSONResponse:
        reached.append(request.url.path)
        return JSONResponse({"ok": True})

    routes = [
        Route("/v2/models/{model}/infer", endpoint, methods=["POST", "GET"]),
        Route("/v2/models/{model}/versions/{version}/infer", endpoint, methods=["POST"]),
        Route("/v2/models/{model}/ready", endpoint, methods=["GET"]),
    ]
    starlette = Starlette(routes=routes, middleware=[Middleware(ShedMiddleware)])
    registry = FakeRegistry()
    starlette.state.registry = registry
    return TestClient(starlette), registry, reached


def test_full_model_is_refused_with_429_before_the_endpoint_runs(app) -> None:
    client, registry, reached = app
    registry.full[("digits", None)] = True
    registry.full[("digits", "2")] = True
    for path in ("/v2/models/digits/infer", "/v2/models/digits/versions/2/infer"):
        reply = client.post(path, content=b'{"inputs": []}')
        assert reply.status_code == 429
        assert reply.headers["retry-after"] == "1"
        assert reply.json() == {"error": "the model's queue is full; retry later"}
    assert reached == []


@pytest.mark.parametrize(
    ("method", "path", "full"),
    [
        ("POST", "/v2/models/digits/infer", False),  # room in the queue
        ("POST", "/v2/models/nope/infer", True),  # unknown model: the endpoint's 404
        ("GET", "/v2/models/digits/infer", True),  # not an inference call
        ("GET", "/v2/models/digits/ready", True),  # other endpoints are never shed
    ],
    ids=["not-full", "unknown-model", "get", "other-endpoint"],
)
def test_requests_the_middleware_is_not_sure_about_reach_the_endpoint(
    app, method: str, path: str, full: bool
) -> None:
    client, registry, reached = app
    registry.full[("digits", None)] = full
    reply = client.request(method, path)
    assert reply.status_code == 200
    assert reached == [path]


def late_gate(share: float) -> LagShedder:
    """The loop's gate (edgeserve/serving/admission.py) after enough late, busy ticks to refuse
    `share` of newcomers once crowded."""
    shedder = LagShedder(0.01)
    while shedder.share < share:
        shedder.observe(0.03, 1.0, 0.05)  # three targets late, busy
    return shedder


def test_a_late_event_loop_refuses_its_share_with_a_server_busy_429(app) -> None:
    """The loop's gate refuses requests for a model with room in its queue once enough
    others are in flight; what it admits reaches the endpoint and leaves the gate."""
    client, registry, reached = app
    registry.full[("digits", None)] = False
    shedder = late_gate(0.5)
    others = loop_lag.MIN_IN_FLIGHT
    assert all(shedder.admit() for _ in range(others))  # still being answered elsewhere
    client.app.state.loop_gate = shedder
    replies = [client.post("/v2/models/digits/infer", content=b"{}") for _ in range(100)]
    refused = [r for r in replies if r.status_code == 429]
    assert abs(len(refused) - shedder.share * 100) <= 1
    assert {r.json()["error"] for r in refused} == {
        "the server is too busy to answer in time; retry later"
    }
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert len(reached) == 100 - len(refused)
    assert shedder.in_flight == others  # each admitted one left once answered
    reply = client.post("/v2/models/nope/infer", content=b"{}")
    assert reply.status_code == 200  # unknown models get the endpoint's answer, not a 429


def test_one_request_at_a_time_is_never_refused_however_late_the_loop(app) -> None:
    """So few in flight cannot be what makes the loop late (another process on the CPU
    can): the gate admits them all, and each leaves it once answered."""
    client, registry, reached = app
    registry.full[("digits", None)] = False
    shedder = late_gate(0.999)
    client.app.state.loop_gate = shedder
    replies = [client.post("/v2/models/digits/infer", content=b"{}") for _ in range(100)]
    assert [r.status_code for r in replies] == [200] * 100 and len(reached) == 100
    assert shedder.in_flight == 0


def test_a_request_whose_endpoint_fails_still_leaves_the_gate() -> None:
    async def endpoint(request: Request) -> JSONResponse:
        raise RuntimeError("the endpoint broke")

    starlette = Starlette(
        routes=[Route("/v2/models/{model}/infer", endpoint, methods=["POST"])],
        middleware=[Middleware(ShedMiddleware)],
    )
    registry = FakeRegistry()
    registry.full[("digits", None)] = False
    starlette.state.registry = registry
    starlette.state.loop_gate = shedder = late_gate(0.5)
    client = TestClient(starlette, raise_server_exceptions=False)
    for _ in range(10):
        assert client.post("/v2/models/digits/infer", content=b"{}").status_code == 500
    assert shedder.in_flight == 0


def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _answers_until_closed(sock: socket.socket, wanted: int) -> list[bytes]:
    """Up to `wanted` answers (head + Content-Length body) read from `sock`, fewer if the
    server closes the connection first."""
    data, answers = b"", []
    while len(answers) < wanted:
        head, found, rest = data.partition(b"\r\n\r\n")
        if found:
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            if len(rest) >= length:
                answers.append(head + found + rest[:length])
                data = rest[length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return answers


def _raw_exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request, read one response (head + Content-Length body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_uvicorn_refuses_a_full_model_and_keeps_the_connection(tmp_path: Path) -> None:
    """The uvicorn engine's (the default) fast path: 429 with Retry-After, and the same
    keep-alive connection then serves the next request normally."""
    repo = tmp_path / "repo"
    (repo / "held" / "1").mkdir(parents=True)
    (repo / "held" / "1" / "model.onnx").write_bytes(_identity_model())
    # Queued rows wait up to 1 s for a batch of 4: two of them fill the queue meanwhile.
    (repo / "held" / "model.toml").write_text(
        'backend = "onnxruntime"\nmax_batch_size = 4\n[batching]\nmax_queue_delay_ms = 1000\n'
        "max_queue_size = 2\nwait_when_idle = true\n"
    )
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}'
    request = (
        b"POST /v2/models/held/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"X-Request-Timeout-Ms: 100\r\n"  # a probe that got queued leaves at once (504)
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with run_server(tmp_path, "[auth]\nenabled = false\n", repository=repo) as server:
        url = f"{server.url}/v2/models/held/infer"
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(httpx.post, url, content=body, timeout=30) for _ in range(2)]
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:

                def refused() -> bytes | None:  # sent until the queue is full
                    reply = _raw_exchange(sock, request)
                    return reply if reply.startswith(b"HTTP/1.1 429") else None

                reply = wait_until(refused, 10, "a 429 from the full queue", interval_s=0)
                assert reply.startswith(b"HTTP/1.1 429"), reply[:200]
                assert b"retry-after: 1" in reply.lower()
                assert b"cache-control: no-store" in reply.lower()  # as every other answer
                assert reply.endswith(b'{"error": "the model\'s queue is full; retry later"}')
                again = _raw_exchange(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
                assert again.startswith(b"HTTP/1.1 200")
            assert {h.result().status_code for h in held} <= {200, 429}  # none left hanging
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        shed = re.search(
            r'^edgeserve_requests_shed_total\{model="held"\} ([0-9.e+]+)$', metrics, re.M
        )
        assert shed is not None and float(shed.group(1)) >= 1  # shed requests are counted


def test_a_request_pipelined_behind_a_parser_429_is_not_cut_off_by_the_keep_alive_timeout(
    tmp_path: Path,
) -> None:
    """The parser writes a shed 429 and arms the connection's keep-alive deadline, as
    after any answer; a request pipelined in the same packet is then being served, and
    its answer (a lone row waiting 1 s for a batch, longer than the 0.1 s keep-alive
    timeout here) must still arrive."""
    repo = tmp_path / "repo"
    for name, queue in (("held", 2), ("slow", 8)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(_identity_model())
        (repo / name / "model.toml").write_text(
            'backend = "onnxruntime"\nmax_batch_size = 4\n[batching]\n'
            f"max_queue_delay_ms = 1000\nmax_queue_size = {queue}\nwait_when_idle = true\n"
        )
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}'

    def request(model: bytes, extra: bytes = b"") -> bytes:
        return (
            b"POST /v2/models/" + model + b"/infer HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\n"
            + extra
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    probe = request(b"held", b"X-Request-Timeout-Ms: 100\r\n")  # if queued, it leaves at once
    config = (
        '[server]\nhost = "127.0.0.1"\nport = {port}\nkeep_alive_timeout_s = 0.1\n'
        f'state_dir = "{tmp_path / "state"}"\n[models]\nrepository = "{repo}"\n'
        "[auth]\nenabled = false\n"
    )
    with run_server(tmp_path, config_text=config) as server, ThreadPoolExecutor(2) as pool:
        url = f"{server.url}/v2/models/held/infer"

        def pipelined_behind_a_429() -> bytes | None:
            """The pipelined request's answer (b"closed" if the connection was closed
            first), once the probe in front of it was shed; None to try again."""
            for _ in range(2):  # fill held's queue (its rows wait 1 s for a batch)
                pool.submit(httpx.post, url, content=body, timeout=30)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                for _ in range(200):  # until the queue is full (as the test above)
                    if _raw_exchange(sock, probe).startswith(b"HTTP/1.1 429"):
                        break
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(probe + request(b"slow"))
                answers = _answers_until_closed(sock, 2)
            if not answers[0].startswith(b"HTTP/1.1 429"):
                return None
            return answers[1] if len(answers) > 1 else b"closed"

        served = wait_until(pipelined_behind_a_429, 60, "a probe shed by the parser")
        assert served.startswith(b"HTTP/1.1 200"), served[:200]


async def _flood(
    port: int,
    request: bytes,
    connections: int,
    done: Callable[[list[bytes]], bool],
    deadline_s: float = 120.0,
) -> list[bytes]:
    """Keep-alive connections each sending `request` as soon as the last one is answered,
    until `done(answers)` holds (checked after every answer; `deadline_s` only ends a run
    that never gets there, and the caller's asserts then say what was missing); the status
    line and body of every answer (b"lost" for a connection closed under a request)."""
    answers: list[bytes] = []
    give_up = time.monotonic() + deadline_s

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not done(answers) and time.monotonic() < give_up:
                writer.write(request)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    answers.append(b"lost")
                    return
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                body = await reader.readexactly(length)
                answers.append(head.split(b"\r\n", 1)[0] + b" " + body)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return answers


@pytest.mark.slow
def test_a_flood_the_loop_cannot_keep_up_with_is_partly_refused_and_every_request_answered(
    tmp_path: Path,
) -> None:
    """Many more requests at once than one event loop answers in time: the loop runs late,
    the HTTP parser refuses part of them with the server-busy 429, the rest are served,
    no request goes unanswered, and after the flood everything is admitted again."""
    with run_server(tmp_path, "[auth]\nenabled = false\n") as server:
        busy = b'{"error": "the server is too busy to answer in time; retry later"}'

        def refused_and_served(answers: list[bytes]) -> bool:
            statuses = {a[9:12] for a in answers}
            return b"429" in statuses and b"200" in statuses

        answers = asyncio.run(_flood(server.port, DIGITS_REQUEST, 256, refused_and_served))
        kinds = {a.split(b" ", 1)[1][:3] if a != b"lost" else a for a in answers}
        assert kinds <= {b"200", b"429"}, kinds  # nothing lost, nothing else
        assert any(a.startswith(b"HTTP/1.1 429 ") and a.endswith(busy) for a in answers)
        assert any(a.startswith(b"HTTP/1.1 200 ") for a in answers)
        url = f"{server.url}/v2/models/digits/infer"
        with httpx.Client(timeout=10) as client:  # at once: one at a time is never refused
            one_at_a_time = [client.post(url, content=DIGITS_BODY).status_code for _ in range(20)]
        assert one_at_a_time == [200] * 20
        at_once: list[int] = []

        def all_answered() -> bool:  # the refused share falls back to nothing
            at_once[:] = asyncio.run(_at_once(url, DIGITS_BODY, 16))
            return at_once == [200] * 16

        wait_until(all_answered, 10, lambda: f"16 answers at once (got {at_once})", interval_s=0)


async def _at_once(url: str, body: bytes, count: int) -> list[int]:
    async with httpx.AsyncClient(timeout=10) as client:
        replies = await asyncio.gather(*(client.post(url, content=body) for _ in range(count)))
    return [r.status_code for r in replies]


@pytest.mark.slow
def test_a_loop_made_late_by_other_work_never_refuses_one_inference_at_a_time(
    tmp_path: Path,
) -> None:
    """Many clients scraping /metrics keep the loop busy and late; an inference client
    sending one request at a time is not what makes it late, and is never refused."""
    scrape = b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"
    connections = 64
    with run_server(tmp_path, "[auth]\nenabled = false\n") as server:
        statuses: list[int] = []
        scrapers_busy = threading.Event()
        inferred = threading.Event()

        def one_at_a_time() -> None:
            scrapers_busy.wait(120)  # every scraper has had an answer: the loop is busy
            with httpx.Client(timeout=30) as client:
                for _ in range(20):
                    url = f"{server.url}/v2/models/digits/infer"
                    statuses.append(client.post(url, content=DIGITS_BODY).status_code)
            inferred.set()

        def enough(answers: list[bytes]) -> bool:
            if len(answers) >= connections:
                scrapers_busy.set()
            return inferred.is_set()

        with ThreadPoolExecutor(1) as pool:
            inferring = pool.submit(one_at_a_time)
            scrapes = asyncio.run(_flood(server.port, scrape, connections, enough))
            inferring.result()
        assert scrapers_busy.is_set() and inferred.is_set()
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in scrapes)
        assert statuses == [200] * 20, statuses


@pytest.mark.slow
def test_grpc_inferences_pass_the_same_loop_gate(tmp_path: Path) -> None:
    """gRPC shares the HTTP side's event loop and so its gate: while the gate refuses
    newcomers, a gRPC inference is answered RESOURCE_EXHAUSTED with the server-busy
    message and counted as shed; once the requests it was blaming have left, gRPC
    inferences are served again and leave nothing in flight.

    The real app and gRPC server run in this process so that the gate can be put in a
    known state: a flood from outside makes it refuse only a varying few per cent.
    """
    import numpy as np
    import tritonclient.grpc.aio as triton
    from tritonclient.utils import InferenceServerException

    from edgeserve.app import build_app
    from edgeserve.config.loader import load_settings
    from tests.serving import MODELS

    config = tmp_path / "edgeserve.toml"
    config.write_text(  # HTTP is not served here; gRPC binds a port the kernel picks
        f'[server]\nhost = "127.0.0.1"\nport = 0\ngrpc_port = "auto"\n'
        f'state_dir = "{tmp_path / "state"}"\n[models]\nrepository = "{MODELS}"\n'
        'load = ["digits"]\n[auth]\nenabled = false\n'
    )
    app = build_app(load_settings(config))
    data = triton.InferInput("input", [1, 64], "FP32")
    data.set_data_from_numpy(np.ones((1, 64), np.float32))

    async def outcome(client: triton.InferenceServerClient) -> str:
        try:
            await client.infer("digits", [data], client_timeout=30)
        except InferenceServerException as exc:
            return f"{exc.status()} {exc.message()}"
        return "OK"

    async def scenario() -> tuple[list[str], int, list[str], int]:
        async with app.router.lifespan_context(app):
            await app.state.loading
            gate = late_gate(0.99)  # admits one newcomer in a hundred once crowded
            held = [gate.admit() for _ in range(loop_lag.MIN_IN_FLIGHT)]  # answered elsewhere
            assert all(held)
            app.state.loop_gate = gate
            async with triton.InferenceServerClient(f"127.0.0.1:{app.state.grpc_port}") as client:
                refused = [await outcome(client) for _ in range(10)]
                shed = app.state.registry.get("digits").stats.shed
                for _ in held:
                    gate.leave()
                served = [await outcome(client) for _ in range(10)]
            return refused, shed, served, gate.in_flight

    refused, shed, served, in_flight = asyncio.run(scenario())
    busy = "StatusCode.RESOURCE_EXHAUSTED the server is too busy to answer in time; retry later"
    assert refused == [busy] * 10
    assert shed == 10
    assert served == ["OK"] * 10  # not crowded any more: admitted however late the loop is
    assert in_flight == 0  # each admitted call left the gate
