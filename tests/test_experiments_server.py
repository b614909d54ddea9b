"""Experiments end to end on a real server with real models, users and feedback."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import helper, load_model_from_string, numpy_helper

from tests.serving import MODELS, RunningServer, run_server, stop
from tests.waiting import wait_until

HELDOUT = np.load(MODELS / "digits" / "heldout.npz")
X, Y = HELDOUT["X"], HELDOUT["y"]


def _build_module():  # models/build.py is a script, not a package
    name = "edgeserve_models_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MODELS / "build.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # dataclasses in build.py look their module up by name
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _slow(model: bytes) -> bytes:
    """The same classifier plus a heavy side computation multiplied by zero."""
    proto = load_model_from_string(model)
    heavy = numpy_helper.from_array(np.full((64, 1024), 1e-3, np.float32), "heavy_w")
    square = numpy_helper.from_array(np.full((1024, 1024), 1e-3, np.float32), "heavy_sq")
    zero = numpy_helper.from_array(np.zeros((1024, 10), np.float32), "heavy_zero")
    proto.graph.initializer.extend([heavy, square, zero])
    nodes = [helper.make_node("MatMul", ["input", "heavy_w"], ["slow_h0"])]
    for i in range(40):
        nodes.append(helper.make_node("MatMul", [f"slow_h{i}", "heavy_sq"], [f"slow_h{i + 1}"]))
    nodes += [
        helper.make_node("MatMul", ["slow_h40", "heavy_zero"], ["hz"]),
        helper.make_node("Add", ["logits_raw", "hz"], ["logits_slow"]),
    ]
    for node in proto.graph.node:  # re-route: logits -> logits_raw, consumers read logits_slow
        node.output[:] = ["logits_raw" if o == "logits" else o for o in node.output]
        node.input[:] = ["logits_slow" if i == "logits" else i for i in node.input]
    proto.graph.node.extend(nodes)
    return proto.SerializeToString()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits 1: a weak model, 2: the good one, 3: the good one but slow."""
    build = _build_module()
    X_train, _, y_train, _ = build.digits_split()
    weights = build.train_digits(X_train, y_train)
    rng = np.random.default_rng(0)
    weak = [
        w + rng.normal(0, 0.9, w.shape).astype(np.float32) if w.ndim == 2 else w for w in weights
    ]
    root = tmp_path_factory.mktemp("repo")
    folder = root / "digits"
    good = (MODELS / "digits" / "1" / "model.onnx").read_bytes()
    for version, blob in ((1, build.digits_onnx(weak)), (2, good), (3, _slow(good))):
        (folder / str(version)).mkdir(parents=True)
        (folder / str(version) / "model.onnx").write_bytes(blob)
    toml = (
        (MODELS / "digits" / "model.toml")
        .read_text()
        .replace("default_version = 2", "default_version = 1")
    )
    (folder / "model.toml").write_text(toml)
    shutil.copy(MODELS / "digits" / "heldout.npz", folder / "heldout.npz")
    return root


CONFIG = (
    "[auth]\nenabled = false\n[telemetry]\nwrite_interval_ms = 20.0\n"
    "[experiments]\ndecision_interval_s = 0.2\nmin_samples = 60\n"
)


@pytest.fixture
def server(tmp_path: Path, repository: Path) -> Iterator[RunningServer]:
    with run_server(tmp_path, CONFIG, repository=repository) as running:
        yield running


def _infer(client: httpx.Client, server: RunningServer, row: int, user: str) -> httpx.Response:
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X[row].tolist()}
        ],
        "outputs": [{"name": "label"}],
    }
    reply = client.post(
        f"{server.url}/v2/models/digits/infer", json=body, headers={"x-user-id": user}
    )
    assert reply.status_code == 200, reply.text
    return reply


def _create(client: httpx.Client, server: RunningServer, **fields: object) -> dict:
    doc = {
        "id": "exp",
        "model": "digits",
        "unit": "header:x-user-id",
        "variants": [
            {"name": "control", "version": 1, "weight": 50},
            {"name": "candidate", "version": 2, "weight": 50},
        ],
        **fields,
    }
    reply = client.post(f"{server.url}/api/experiments", json=doc)
    assert reply.status_code == 201, reply.text
    return reply.json()


def _status(client: httpx.Client, server: RunningServer) -> dict:
    return client.get(f"{server.url}/api/experiments/exp").json()


@pytest.mark.slow
def test_every_user_keeps_their_variant(server: RunningServer) -> None:
    with httpx.Client(timeout=10) as client:
        _create(client, server)
        seen: dict[str, set[str]] = {}
        for round_ in range(3):
            for u in range(150):
                reply = _infer(client, server, (u + round_) % len(X), f"user-{u}")
                seen.setdefault(f"user-{u}", set()).add(reply.headers["x-edgeserve-variant"])
                assert reply.json()["model_version"] == (
                    "1" if reply.headers["x-edgeserve-variant"] == "exp/control" else "2"
                )
        assert all(len(v) == 1 for v in seen.values())
        shares = [next(iter(v)) for v in seen.values()].count("exp/candidate") / len(seen)
        assert 0.35 < shares < 0.65
        report = client.get(f"{server.url}/api/experiments/exp/report").json()
        assert not report["sample_ratio_mismatch"]["mismatch"]


@pytest.mark.slow
def test_shadow_never_changes_a_response(server: RunningServer) -> None:
    with httpx.Client(timeout=10) as client:
        direct = [_infer(client, server, i, f"u{i}").json() for i in range(60)]
        _create(
            client,
            server,
            mode="shadow",
            variants=[
                {"name": "control", "version": 1, "weight": 100},
                {"name": "candidate", "version": 3, "weight": 0},
            ],
        )  # the slow one
        shadowed = [_infer(client, server, i, f"u{i}").json() for i in range(60)]
        for a, b in zip(direct, shadowed, strict=True):
            assert a["outputs"] == b["outputs"] and b["model_version"] == "1"

        def counted() -> dict | None:
            report = client.get(f"{server.url}/api/experiments/exp/report").json()
            variants = report["variants"]
            return report if variants[1]["requests"] > 0 and variants[0]["requests"] == 60 else None

        report = wait_until(counted, 30, "the report to count the shadow copies", interval_s=0.2)
        assert report["variants"][1]["requests"] > 0  # the candidate saw copies
        assert report["variants"][0]["requests"] == 60


@pytest.mark.slow
def test_slow_candidate_is_rolled_back_automatically(server: RunningServer) -> None:
    with httpx.Client(timeout=30) as client:
        _create(
            client,
            server,
            auto=True,
            max_p99_ms=25.0,
            variants=[
                {"name": "control", "version": 2, "weight": 50},
                {"name": "candidate", "version": 3, "weight": 50},
            ],
        )
        for i in range(400):
            _infer(client, server, i % len(X), f"user-{i % 80}")
            if _status(client, server)["status"] == "concluded":
                break
        exp = _status(client, server)
        assert exp["decision"] == "rolled_back", exp
        assert "p99" in exp["reason"] or "latency_ms significantly worse" in exp["reason"]
        assert [v["weight"] for v in exp["variants"]] == [50.0, 0.0]
        assert any(h["event"] == "rolled_back" for h in exp["history"])
        replies = [_infer(client, server, 0, f"user-{u}") for u in range(20)]
        # concluded: traffic is back on the model's default version, never the candidate
        assert "3" not in {r.json()["model_version"] for r in replies}


@pytest.mark.slow
def test_better_candidate_is_promoted_and_becomes_the_default(
    server: RunningServer, tmp_path: Path, repository: Path
) -> None:
    rng = np.random.default_rng(5)
    with httpx.Client(timeout=10) as client:
        _create(client, server, auto=True, primary_metric="accuracy")
        for _ in range(1500):
            row = int(rng.integers(len(X)))
            reply = _infer(client, server, row, f"user-{int(rng.integers(300))}")
            client.post(
                f"{server.url}/api/feedback",
                json={"request_id": reply.headers["x-request-id"], "label": str(int(Y[row]))},
            )
            if _status(client, server)["status"] == "concluded":
                break
        exp = _status(client, server)
        report = client.get(f"{server.url}/api/experiments/exp/report").json()
        print(
            f"\npromotion after {report['variants'][0]['labelled']} + "
            f"{report['variants'][1]['labelled']} labelled requests: {exp['reason']}"
        )
        assert exp["decision"] == "promoted", exp
        default = client.post(
            f"{server.url}/v2/models/digits/infer",
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X[0].tolist()}
                ]
            },
        )
        assert default.json()["model_version"] == "2"
        accuracy = [v["accuracy"] for v in report["variants"]]
        assert accuracy[1] > accuracy[0]
    # model.toml still says default_version = 1: the promotion must outlive a restart
    assert stop(server.process) == 0
    with run_server(tmp_path, CONFIG, repository=repository) as restarted:
        reply = httpx.post(
            f"{restarted.url}/v2/models/digits/infer",
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X[0].tolist()}
                ]
            },
        )
        assert reply.json()["model_version"] == "2", restarted.log()[-2000:]
        assert "promotion restored model=digits version=2" in restarted.log()


def test_bad_experiment_definitions_are_refused(server: RunningServer) -> None:
    base = {
        "id": "x",
        "model": "digits",
        "variants": [{"name": "a", "version": 1}, {"name": "b", "version": 2}],
    }
    cases = [
        ({**base, "model": "nope"}, "unknown model"),
        (
            {**base, "variants": [{"name": "a", "version": 9}, {"name": "b", "version": 2}]},
            "has no version 9",
        ),
        ({**base, "variants": base["variants"][:1]}, "2 to 8 variants"),
        ({**base, "unit": "cookie:x"}, "'unit'"),
        ({**base, "mode": "chaos"}, "'mode'"),
        ({**base, "stages": [50, 10]}, "'stages'"),
        ({**base, "bogus": 1}, "unknown experiment field 'bogus'"),
        ({**base, "id": "../x"}, "'id'"),
        ({**base, "id": "x\n"}, "'id'"),
        ({**base, "running_p": 1}, "'running_p' has an invalid value"),
        ({**base, "running_p": [[1, 2]]}, "'running_p' has an invalid value"),
        ({**base, "history": 7}, "'history' has an invalid value"),
    ]
    with httpx.Client(timeout=10) as client:
        for doc, message in cases:
            reply = client.post(f"{server.url}/api/experiments", json=doc)
            assert reply.status_code == 400 and message in reply.json()["error"], (doc, reply.text)


def test_a_flag_kill_switch_takes_effect_on_the_next_request(server: RunningServer) -> None:
    with httpx.Client(timeout=10) as client:
        _create(
            client,
            server,
            flag="digits-v2",
            variants=[
                {"name": "control", "version": 1, "weight": 0},
                {"name": "candidate", "version": 2, "weight": 100},
            ],
        )
        assert _infer(client, server, 0, "u1").json()["model_version"] == "2"
        reply = client.put(f"{server.url}/api/flags/digits-v2", json={"enabled": False})
        assert reply.status_code == 200
        assert _infer(client, server, 0, "u1").json()["model_version"] == "1"
        client.put(f"{server.url}/api/flags/model.digits", json={"enabled": False})
        body = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X[0].tolist()}
            ]
        }
        assert client.post(f"{server.url}/v2/models/digits/infer", json=body).status_code == 503
        assert client.put(f"{server.url}/api/flags/x", json={"enabled": "no"}).status_code == 400


def test_the_experiment_command_manages_a_running_server(
    server: RunningServer, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from edgeserve.cli.group import main

    definition = tmp_path / "exp.json"
    definition.write_text(
        '{"id": "cli", "model": "digits", "variants": ['
        '{"name": "a", "version": 1, "weight": 90},'
        '{"name": "b", "version": 2, "weight": 10}]}'
    )
    runner = CliRunner()
    url = ["--url", server.url]
    assert runner.invoke(main, ["experiment", "create", str(definition), *url]).exit_code == 0
    listed = runner.invoke(main, ["experiment", "list", *url])
    assert "cli\tdigits\tactive\tsplit\ta:90/b:10" in listed.output
    assert runner.invoke(main, ["experiment", "weights", "cli", "80", "20", *url]).exit_code == 0
    paused = runner.invoke(main, ["experiment", "pause", "cli", *url])
    assert paused.output.strip() == "cli: paused"
    report = runner.invoke(main, ["experiment", "report", "cli", *url])
    assert report.exit_code == 0, report.output
    lines = report.output.splitlines()
    assert lines[0] == "experiment cli: model digits, split, paused, unit request_id"
    assert lines[2].split()[:4] == ["variant", "version", "weight", "units"]
    assert any(line.startswith("primary accuracy: ") for line in lines)
    assert any(line.startswith("decision: continue - ") for line in lines)
    assert len(lines) < 15 and "{" not in report.output  # a summary, not the JSON
    full = runner.invoke(main, ["experiment", "report", "cli", "--json", *url])
    assert json.loads(full.output)["decision"]["action"] == "continue"
    again = runner.invoke(main, ["experiment", "create", str(definition), *url])
    assert again.exit_code == 1 and "409: experiment 'cli' exists" in again.output
    gone = runner.invoke(main, ["experiment", "list", "--url", "http://127.0.0.1:1"])
    assert gone.exit_code == 1 and "cannot reach" in gone.output
