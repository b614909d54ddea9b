"""Builders for the server-side update tests (real keys, real digits bundles, real
servers), plus small tests of the pieces they rely on.

Other `test_updates_*` modules import `UpdateKit` and friends from here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgeserve.errors import InferenceFailed, Overloaded
from edgeserve.serving.scheduler import RunResult
from edgeserve.updates.validation import record_samples
from edgeserve.updates.watch import ObservedScheduler
from tests.serving import MODELS
from tests.waiting import wait_until
from updater import (
    SampleTensor,
    ValidationSample,
    create_bundle,
    generate_master_key_file,
    generate_signing_key,
    generate_unwrap_key_file,
    public_key_text,
)

DIGITS = MODELS / "digits"
BAD_MODEL_TOML = """\
backend = "onnxruntime"
max_batch_size = 64
[[inputs]]
name = "input"
datatype = "FP32"
shape = [-1, 64]
[[outputs]]
name = "probabilities"
datatype = "FP32"
shape = [-1, 10]
[[outputs]]
name = "label"
datatype = "INT64"
shape = [-1]
"""


def failing_digits_model() -> bytes:
    """A digits-shaped ONNX model that fails at run time when input[:, 0] >= 0.1.

    The first pixel * 100 indexes a 10-entry table (Gather): validation samples with a
    blank first pixel pass, real digits traffic (pixels 0..16) fails in ONNX Runtime.
    """
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [64, 10], np.linspace(-1, 1, 640, dtype=np.float32).tolist()
    )
    table = helper.make_tensor("table", TensorProto.FLOAT, [10], [0.0] * 10)
    hundred = helper.make_tensor("hundred", TensorProto.FLOAT, [], [100.0])
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [0])
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["first"]),
        helper.make_node("Mul", ["first", "hundred"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["bias"], axis=0),
        helper.make_node("MatMul", ["input", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "failing_digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        ],
        [w, table, hundred, starts, ends, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def blank_first_pixel_samples(model: bytes) -> list[ValidationSample]:
    """Samples the failing model passes: inputs whose first pixel is 0."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    samples = []
    for k in range(2):
        x = np.zeros((1, 64), dtype=np.float32)
        x[0, 1:] = np.arange(63, dtype=np.float32) % (5 + k)
        probabilities, label = session.run(None, {"input": x})
        samples.append(
            ValidationSample(
                {"input": SampleTensor("FP32", (1, 64), tuple(x.ravel().tolist()))},
                {
                    "probabilities": tuple(probabilities.ravel().tolist()),
                    "label": tuple(label.ravel().tolist()),
                },
                1e-4,
            )
        )
    return samples


@dataclass
class UpdateKit:
    """Key files, a config and digits bundles in a tmp folder."""

    root: Path
    built: int = 0
    samples_cache: dict[int, list[ValidationSample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = self.root / "author"
        self.signing_path = keys / "signing.pem"
        self.signing = generate_signing_key(self.signing_path)
        self.fleet_path = keys / "fleet.key"
        self.fleet = generate_unwrap_key_file(self.fleet_path, "fleet")
        self.state_dir = self.root / "state"
        self.master_path = self.state_dir / "keys" / "master.key"
        generate_master_key_file(self.master_path)

    def config(self, *, auth: bool = False, **updater: object) -> str:
        """Extra config for `run_server`: [updater] with our keys, auth off unless asked."""
        lines = [
            "[updater]",
            f'trusted_keys = ["{public_key_text(self.signing)}"]',
            f'bundle_key_files = ["{self.fleet_path}"]',
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in updater.items()]
        text = "\n".join(lines) + "\n[telemetry]\nenabled = false\n"
        if not auth:
            text += "[auth]\nenabled = false\n"
        return text

    def bundle(
        self,
        version: int,
        source: int = 2,
        *,
        model_bytes: bytes | None = None,
        model_toml: str | None = None,
        samples: list[ValidationSample] | None = None,
    ) -> Path:
        """A real signed bundle of `digits` version `version` from models/digits/<source>."""
        self.built += 1
        model_dir = self.root / "src" / f"{self.built}" / "digits"
        (model_dir / str(version)).mkdir(parents=True)
        (model_dir / "model.toml").write_text(model_toml or (DIGITS / "model.toml").read_text())
        target = model_dir / str(version) / "model.onnx"
        if model_bytes is None:
            shutil.copy(DIGITS / str(source) / "model.onnx", target)
            if source not in self.samples_cache:
                self.samples_cache[source] = record_samples(model_dir, version)
            samples = self.samples_cache[source] if samples is None else samples
        else:
            target.write_bytes(model_bytes)
        out = self.root / f"digits-{version}-{self.built}.bundle"
        create_bundle(model_dir, version, self.signing, self.fleet, out, samples=samples or [])
        return out

    def failing_bundle(self, version: int) -> Path:
        model = failing_digits_model()
        return self.bundle(
            version,
            model_bytes=model,
            model_toml=BAD_MODEL_TOML,
            samples=blank_first_pixel_samples(model),
        )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def digits_rows(rows: int = 1, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).integers(1, 16, (rows, 64)).astype(float)
    return {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": x.ravel().tolist()}
        ]
    }


def upload(url: str, bundle: Path, token: str | None = None, **params: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        f"{url}/api/models/digits/bundles",
        content=bundle.read_bytes(),
        params=params,
        headers=headers,
        timeout=120,
    )


def served_version(url: str) -> str:
    r = httpx.post(f"{url}/v2/models/digits/infer", json=digits_rows(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def wait_for(check: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    wait_until(check, timeout_s, what)


class Load:
    """Threads sending digits inference requests until stopped; every outcome recorded."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        # start, latency_s, status, and the version served (or a refusal's reason)
        self.results: list[tuple[float, float, int, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        body = digits_rows(1, seed)
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post(f"{self.url}/v2/models/digits/infer", json=body)
                    doc = r.json()  # the version served, or for a refusal its reason
                    status, version = (
                        r.status_code,
                        doc.get("model_version") or doc.get("error", ""),
                    )
                except httpx.HTTPError as exc:
                    status, version = -1, type(exc).__name__
                with self._lock:
                    self.results.append((started, time.monotonic() - started, status, version))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def failures(self) -> list[tuple[float, float, int, str]]:
        """Answers that are downtime: anything but 200, except the 429 a box under full
        CPU load may give because its event loop runs late (seen under `.ci/stress`: 1 of
        several thousand). A 429 because a version is being replaced is downtime."""
        return [
            r
            for r in self.results
            if r[2] != 200 and not (r[2] == 429 and "being replaced" not in r[3])
        ]

    def p99_ms(self, start: float = 0.0, end: float = float("inf")) -> float:
        latencies = sorted(r[1] for r in self.results if start <= r[0] <= end)
        if not latencies:
            return float("nan")
        return 1000 * latencies[max(0, int(np.ceil(0.99 * len(latencies))) - 1)]


# -- tests of the pieces ----------------------------------------------------------------


class _Inner:
    depth = 3

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    async def submit(self, inputs, outputs, deadline) -> RunResult:
        if self.error is not None:
            raise self.error
        return RunResult({}, 0.0, 0.0, 1, 1)

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("error", "counted"),
    [(None, (True,)), (InferenceFailed("boom"), (False,)), (Overloaded("full"), ())],
)
def test_observed_scheduler_counts_only_the_models_own_failures(
    error: Exception | None, counted: tuple[bool, ...]
) -> None:
    seen: list[bool] = []
    scheduler = ObservedScheduler(_Inner(error), lambda ok, ms, rows, caller: seen.append(ok))
    try:
        asyncio.run(scheduler.submit({}, None, None))
    except Exception as exc:
        assert exc is error
    assert tuple(seen) == counted
    assert scheduler.depth == 3  # everything else is the inner scheduler's


def test_failing_model_passes_its_samples_but_not_digits_traffic() -> None:
    model = failing_digits_model()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for sample in blank_first_pixel_samples(model):
        x = np.asarray(sample.inputs["input"].data, dtype=np.float32).reshape(1, 64)
        session.run(None, {"input": x})
    with pytest.raises(Exception, match=r"out of bounds|indices"):
        session.run(None, {"input": np.full((1, 64), 5.0, dtype=np.float32)})


def test_recorded_samples_are_deterministic(tmp_path: Path) -> None:
    one = record_samples(DIGITS, 2)
    assert one == record_samples(DIGITS, 2)
    assert len(one) == 4 and set(one[0].expected) == {"probabilities", "label"}
    assert os.path.exists(DIGITS / "2" / "model.onnx")
