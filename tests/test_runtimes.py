"""Both runtimes behind the one Runtime interface, on the real demo models."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from edgeserve.errors import InferenceFailed
from edgeserve.runtime import Runtime, RuntimeLoadError, ThreadPlan, create_runtime
from edgeserve.runtime.select import time_calls
from edgeserve.serving.repository import read_model
from tests.serving import MODELS

DIGITS = read_model(MODELS / "digits")
HELDOUT = np.load(MODELS / "digits" / "heldout.npz")


# FP32 agrees to rounding. INT8 is two quantizations of one version (ONNX Runtime's QDQ
# model.onnx, NNCF's model.xml for OpenVINO), each within 0.05 of FP32 on these rows.
TOLERANCE = {1: 1e-5, 2: 0.06}


@pytest.mark.parametrize("version", DIGITS.versions)
def test_both_runtimes_answer_the_same(version: int) -> None:
    files = DIGITS.read_files(version)
    onnx = create_runtime("onnxruntime", files, ThreadPlan())
    openvino = create_runtime("openvino", files, ThreadPlan())
    assert onnx.inputs == openvino.inputs
    X = HELDOUT["X"]
    a = onnx.run({"input": X})
    b = openvino.run({"input": X})
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=TOLERANCE[version])
    agree = np.mean(a["label"] == b["label"])
    assert agree >= 0.995, f"labels agree on only {agree:.3%} of the held-out rows"


def test_auto_without_samples_prefers_openvino_and_loads_from_bytes() -> None:
    runtime = create_runtime("auto", DIGITS.read_files(1), ThreadPlan())
    assert runtime.backend == "openvino"


def one_row(runtime: Runtime) -> list[dict[str, np.ndarray]]:
    return [{"input": HELDOUT["X"][:1]}, {"input": HELDOUT["X"][:8]}]


@pytest.mark.parametrize("faster", ["onnxruntime", "openvino"])
def test_auto_with_samples_keeps_the_backend_timed_faster_and_closes_the_other(
    faster: str,
) -> None:
    timed: list[tuple[str, int]] = []
    closed: list[str] = []

    def timer(runtimes: Sequence[Runtime], feeds: Sequence[Mapping]) -> dict[str, float]:
        for runtime in runtimes:
            timed.append((runtime.backend, len(feeds)))
            runtime.close = lambda b=runtime.backend: closed.append(b)  # type: ignore[method-assign]
        return {r.backend: 1e-5 if r.backend == faster else 4e-5 for r in runtimes}

    files = DIGITS.read_files(2)
    runtime = create_runtime("auto", files, ThreadPlan(), "digits", samples=one_row, timer=timer)
    assert runtime.backend == faster
    assert sorted(timed) == [("onnxruntime", 2), ("openvino", 2)]
    assert closed == [{"onnxruntime": "openvino", "openvino": "onnxruntime"}[faster]]
    assert runtime.run({"input": HELDOUT["X"][:3]})["label"].shape == (3,)


def test_auto_with_samples_times_both_real_runtimes_and_keeps_the_faster(caplog) -> None:
    files = DIGITS.read_files(2)
    both = [create_runtime(b, files, ThreadPlan()) for b in ("openvino", "onnxruntime")]
    seconds = time_calls(both, one_row(both[0]))
    assert set(seconds) == {"onnxruntime", "openvino"} and min(seconds.values()) > 0

    measured: dict[str, float] = {}

    def recording(runtimes: Sequence[Runtime], feeds: Sequence[Mapping]) -> dict[str, float]:
        measured.update(time_calls(runtimes, feeds))
        return measured

    with caplog.at_level(logging.INFO, logger="edgeserve.runtime.select"):
        runtime = create_runtime("auto", files, ThreadPlan(), "d", samples=one_row, timer=recording)
    assert runtime.backend == min(measured, key=measured.__getitem__)
    assert f"backend chosen model=d backend={runtime.backend} " in caplog.text
    assert "openvino_us=" in caplog.text and "onnxruntime_us=" in caplog.text


class FailsToCompute(Runtime):
    """A loaded runtime whose every call fails, as a backend that cannot run an input."""

    backend = "openvino"

    def _load(self, files: Mapping[str, bytes]) -> None:
        pass

    def _run(self, inputs: Mapping, outputs: Sequence[str] | None) -> dict[str, np.ndarray]:
        raise RuntimeError("this backend cannot compute the input")


def test_a_runtime_that_fails_on_the_samples_is_left_out_of_the_timing() -> None:
    working = create_runtime("onnxruntime", DIGITS.read_files(1), ThreadPlan())
    seconds = time_calls([FailsToCompute(ThreadPlan()), working], one_row(working))
    assert list(seconds) == ["onnxruntime"]


def test_auto_with_samples_but_one_loadable_backend_times_nothing() -> None:
    """digits v2 without its model.onnx: only OpenVINO can load the IR."""
    files = {k: v for k, v in DIGITS.read_files(2).items() if k != "model.onnx"}

    def timer(runtimes: Sequence[Runtime], feeds: Sequence[Mapping]) -> dict[str, float]:
        raise AssertionError("nothing to choose between")

    runtime = create_runtime("auto", files, ThreadPlan(), samples=one_row, timer=timer)
    assert runtime.backend == "openvino"


def test_auto_falls_back_to_onnxruntime_when_openvino_cannot_compile() -> None:
    from onnx import TensorProto, helper

    # A string tensor: ONNX Runtime runs it, OpenVINO has no string tensors.
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    runtime = create_runtime("auto", {"model.onnx": model.SerializeToString()}, ThreadPlan())
    assert runtime.backend == "onnxruntime"
    out = runtime.run({"text": np.array([b"hello", b"world"], dtype=object)})
    assert out["same"].tolist() == ["hello", "world"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_file_that_is_not_a_model_is_a_load_error(backend: str) -> None:
    with pytest.raises(RuntimeLoadError, match=f"{backend} could not load the model"):
        create_runtime(backend, {"model.onnx": b"not a model at all"}, ThreadPlan())


def test_missing_model_file_is_a_load_error() -> None:
    with pytest.raises(RuntimeLoadError, match=r"needs a model\.onnx"):
        create_runtime("onnxruntime", {}, ThreadPlan())


def test_a_backend_failure_at_run_is_an_inference_error_without_backend_text() -> None:
    runtime = create_runtime("onnxruntime", DIGITS.read_files(1), ThreadPlan())
    with pytest.raises(InferenceFailed) as caught:
        runtime.run({"input": np.zeros((1, 3), np.float32)})
    assert "onnxruntime" not in str(caught.value).lower()


def test_openvino_usage_telemetry_is_switched_off() -> None:
    """In a fresh process that serves an OpenVINO model, the telemetry library never loads
    and OpenVINO's tools use their no-op stub."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from edgeserve.runtime import create_runtime, ThreadPlan\n"
        "from edgeserve.serving.repository import read_model\n"
        "from tests.serving import MODELS\n"
        "files = read_model(MODELS / 'digits').read_files(1)\n"
        "r = create_runtime('openvino', files, ThreadPlan())\n"
        "import openvino.tools.ovc.telemetry_utils as t\n"
        "print(sys.modules.get('openvino_telemetry'), t.tm.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=MODELS.parent
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "openvino.tools.ovc.telemetry_stub"]


def test_onnx_runtime_sessions_run_without_the_cpu_memory_arena() -> None:
    """The arena put long-running processes on a slow level for tens of seconds at a time
    (bench/RESULTS.md); a session made by edgeserve must have it off."""
    runtime = create_runtime("onnxruntime", DIGITS.read_files(2), ThreadPlan())
    options = runtime._session.get_session_options()  # type: ignore[attr-defined]
    assert options.enable_cpu_mem_arena is False
    runtime.close()
