"""Feedback cannot steer an experiment: one label per request id, only from the caller
that made the request (or a token with scope `feedback`), and server-made request ids
that no other caller can guess. Through a real server with auth on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeserve.auth import issuer
from tests.serving import RunningServer, run_server
from tests.test_experiments_server import X, Y, repository  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

CONFIG = (
    "[telemetry]\nwrite_interval_ms = 20.0\n"
    "[experiments]\ndecision_interval_s = 0.2\nmin_samples = 60\n"
    "[auth]\nfailed_auth_burst = 0\n"
)
REPEATS = 12  # labels the attacker sends for each of its requests


@pytest.fixture
def live(tmp_path: Path, repository: Path) -> Iterator[tuple[RunningServer, Path]]:  # noqa: F811
    state_dir = tmp_path / "state"
    issuer.init_keys(state_dir)
    with run_server(tmp_path, CONFIG, repository=repository) as server:
        yield server, state_dir


def bearer(state_dir: Path, subject: str, *scopes: str) -> dict[str, str]:
    token = issuer.create_token(state_dir, scopes, 300, subject, "edgeserve-local", "edgeserve")
    return {"Authorization": f"Bearer {token}"}


def infer(client: httpx.Client, headers: dict[str, str], row: int, user: str) -> httpx.Response:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X[row].tolist()}]
    }
    reply = client.post(
        "/v2/models/digits/infer", json=body, headers={**headers, "x-user-id": user}
    )
    assert reply.status_code == 200, reply.text
    return reply


def label(client: httpx.Client, headers: dict[str, str], request_id: str, **doc: object) -> int:
    reply = client.post("/api/feedback", json={"request_id": request_id, **doc}, headers=headers)
    return reply.status_code


def test_one_client_cannot_force_the_worse_version_to_be_promoted(
    live: tuple[RunningServer, Path],
) -> None:
    server, state_dir = live
    admin = bearer(state_dir, "operator", "admin", "read")
    attacker = bearer(state_dir, "attacker", "infer")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        # The control (2) is the good model, the candidate (1) the weak one.
        created = client.post(
            "/api/experiments",
            headers=admin,
            json={
                "id": "exp",
                "model": "digits",
                "unit": "header:x-user-id",
                "auto": True,
                "primary_metric": "accuracy",
                "variants": [
                    {"name": "control", "version": 2, "weight": 50},
                    {"name": "candidate", "version": 1, "weight": 50},
                ],
            },
        )
        assert created.status_code == 201, created.text
        statuses = []
        for i in range(40):
            reply = infer(client, attacker, i, f"user-{i}")
            variant = reply.headers.get("x-edgeserve-variant")
            if variant is None:  # the experiment has concluded already
                break
            candidate = variant == "exp/candidate"
            for _ in range(REPEATS):  # the candidate is always right, the control never
                statuses.append(
                    label(client, attacker, reply.headers["x-request-id"], correct=candidate)
                )
        deadline = time.monotonic() + 30
        while True:  # until every accepted label is in the report (its decision: the loop's)
            report = client.get("/api/experiments/exp/report", headers=admin).json()
            exp = client.get("/api/experiments/exp", headers=admin).json()
            labelled = [v["labelled"] for v in report["variants"]]
            if exp["status"] == "concluded" or sum(labelled) >= 40:
                break
            assert time.monotonic() < deadline, (report, exp)
            time.sleep(0.1)
        assert exp["status"] != "concluded", exp
        assert sum(labelled) == 40, report
        assert report["decision"]["action"] == "continue", report["decision"]
        assert "waiting for 60 samples" in report["decision"]["reason"]
        assert statuses.count(202) == 40  # one label per request id, the rest refused
        assert set(statuses) == {202, 409}


def test_only_the_caller_that_made_a_request_may_label_it(
    live: tuple[RunningServer, Path],
) -> None:
    server, state_dir = live
    alice = bearer(state_dir, "alice", "infer")
    mallory = bearer(state_dir, "mallory", "infer")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ids = [infer(client, alice, i, "u").headers["x-request-id"] for i in range(4)]
        assert label(client, mallory, ids[0], label=str(Y[0])) == 403
        labeller = bearer(state_dir, "labeller", "feedback")
        admin = bearer(state_dir, "operator", "admin")
        assert label(client, alice, ids[0], label=str(Y[0])) == 202
        assert label(client, alice, ids[0], label="3") == 409  # the first label stands
        assert label(client, labeller, ids[1], label=str(Y[1])) == 202
        assert label(client, admin, ids[2], label=str(Y[2])) == 202  # admin implies feedback
        assert label(client, alice, "no-such-request", label="1") == 404
        # Only the feedback scope, not infer: the labeller cannot run the model itself.
        body = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X[0].tolist()}
            ]
        }
        assert (
            client.post("/v2/models/digits/infer", json=body, headers=labeller).status_code == 403
        )


def test_server_made_request_ids_cannot_be_guessed(live: tuple[RunningServer, Path]) -> None:
    server, state_dir = live
    alice = bearer(state_dir, "alice", "infer")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ids = [infer(client, alice, i, "u").headers["x-request-id"] for i in range(20)]
    assert len(set(ids)) == 20 and all(len(i) == 32 for i in ids)
    # The clock's milliseconds first (they sort by time: the request_id index grows at its
    # end), then 80 bits that share nothing with any other id's and count nothing.
    made = [int(i[:12], 16) / 1000 for i in ids]
    assert made == sorted(made) and all(abs(t - time.time()) < 600 for t in made)
    assert len({i[12:] for i in ids}) == 20
    assert len({i[12:22] for i in ids}) == 20 and len({i[22:] for i in ids}) == 20
