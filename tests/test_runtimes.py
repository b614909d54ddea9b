"""Both runtimes behind the one Runtime interface, on the real demo models."""

from __future__ import annotations

import numpy as np
import pytest

from edgeserve.errors import InferenceFailed
from edgeserve.repository import read_model
from edgeserve.runtime import RuntimeLoadError, ThreadPlan, create_runtime
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


def test_auto_prefers_openvino_and_loads_from_bytes() -> None:
    runtime = create_runtime("auto", DIGITS.read_files(1), ThreadPlan())
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
        "from edgeserve.repository import read_model\n"
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
