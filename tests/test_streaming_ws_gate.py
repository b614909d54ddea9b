"""WebSocket messages pass the event loop's gate like HTTP and gRPC inferences do: a
stream cannot bypass the refusals that keep the shared loop on time (issue 18).

The gate is a real `LoopLagMonitor` primed with real lateness samples (a loop ten
targets late at full CPU) and holding four admitted requests, so it refuses from the
first newcomer on: what is tested is that each transport asks it, not how fast a box
must be loaded before it refuses (that depends on the box; tests/test_loop_lag.py
covers the shedder's arithmetic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from starlette.testclient import TestClient

from edgeserve.app import build_app
from edgeserve.config.loader import load_settings
from edgeserve.serving.admission import MIN_IN_FLIGHT, SERVER_BUSY_MESSAGE, LoopLagMonitor
from tests.test_batch_support import digits_rows, model_repository, v2_request
from tests.waiting import wait_until


def refusing_gate() -> LoopLagMonitor:
    """A gate whose loop ran ten targets late at full CPU for a second, with enough
    requests in flight that refusing newcomers helps."""
    gate = LoopLagMonitor(target_s=0.01)
    for _ in range(100):
        gate.shedder.observe(lag_s=0.1, busy=1.0, span_s=1.0)
    for _ in range(MIN_IN_FLIGHT):
        assert gate.admit()
    return gate


def test_a_refusing_gate_refuses_stream_messages_and_http_requests_alike(
    tmp_path: Path,
) -> None:
    repo = model_repository(tmp_path)
    config = tmp_path / "edgeserve.toml"
    config.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[models]\nrepository = "{repo}"\nbackend = "onnxruntime"\n'
        "[auth]\nenabled = false\n"
    )
    x, _ = digits_rows()
    body = v2_request(np.asarray(x[:1]))
    with TestClient(build_app(load_settings(config))) as client:
        wait_until(lambda: client.get("/v2/health/ready").is_success, 60.0, "models loaded")
        with client.websocket_connect("/api/stream/digits") as ws:
            ws.send_json(body)
            assert ws.receive_json().get("outputs")  # an idle gate admits

            client.app.state.loop_gate = gate = refusing_gate()
            for _ in range(3):
                ws.send_json(body)
                doc = ws.receive_json()
                assert doc["status"] == 429 and doc["error"] == SERVER_BUSY_MESSAGE, doc
            assert gate.shedder.in_flight == MIN_IN_FLIGHT  # refusals hold no place

            reply = client.post("/v2/models/digits/infer", json=body)
            assert reply.status_code == 429 and reply.json()["error"] == SERVER_BUSY_MESSAGE

            for _ in range(MIN_IN_FLIGHT):  # the loop's work is answered: not crowded
                gate.leave()
            ws.send_json(body)
            assert ws.receive_json().get("outputs")
            assert client.post("/v2/models/digits/infer", json=body).status_code == 200
