"""WebSocket messages pass the event loop's gate like HTTP and gRPC inferences do: a
stream cannot bypass the refusals that keep the shared loop on time (issue 18)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
from websockets.sync.client import connect

from edgeserve.serving.admission import SERVER_BUSY_MESSAGE
from tests.serving import run_server
from tests.test_batch_support import digits_rows, model_repository, server_config, v2_request

MESSAGES = 1000  # per stream
STREAMS = 4
WAIT_S = 120.0


def test_stream_messages_are_refused_by_a_late_loop_with_429_documents(tmp_path: Path) -> None:
    """A loop-lag target no loop can meet (1 us) with a full stream window in flight:
    the gate refuses a share of the messages, each answered with status 429 in place."""
    repo = model_repository(tmp_path)
    config = server_config(
        repo, "[jobs]\nstream_window = 64\n", server="loop_lag_target_ms = 0.001\n"
    )
    x, _ = digits_rows()
    rows = np.repeat(x[:1], 64, axis=0)  # decoded on the loop: keeps it busy
    text = json.dumps(v2_request(rows))
    with run_server(tmp_path, config_text=config) as server:
        url = server.url.replace("http://", "ws://") + "/api/stream/digits"
        counts: list[tuple[int, int]] = []

        def one_stream() -> None:
            refused = received = sent = 0
            with connect(url, max_size=None) as ws:
                deadline = time.monotonic() + WAIT_S
                while received < MESSAGES and time.monotonic() < deadline:
                    while sent < MESSAGES and sent - received < 64:
                        ws.send(text)
                        sent += 1
                    doc = json.loads(ws.recv(timeout=WAIT_S))
                    received += 1
                    if doc.get("status") == 429 and doc.get("error") == SERVER_BUSY_MESSAGE:
                        refused += 1
            counts.append((refused, received))

        streams = [threading.Thread(target=one_stream) for _ in range(STREAMS)]
        for thread in streams:
            thread.start()
        for thread in streams:
            thread.join(WAIT_S)
        refused = sum(r for r, _ in counts)
        print(f"stream messages refused by the loop gate: {refused} of {sum(n for _, n in counts)}")
        assert refused > 0
