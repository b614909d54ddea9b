"""Run a version folder's files as edgeserve's runtimes load them, for the build's scores and
the behaviour check (`rebuild_check.py`): both must see what the server would answer."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def loaded_file(files: Mapping[str, bytes], backend: str) -> str:
    """The file a backend loads from a version folder, as edgeserve's runtimes choose it."""
    return "model.xml" if backend == "openvino" and "model.xml" in files else "model.onnx"


def run(files: Mapping[str, bytes], backend: str, X: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the file `backend` loads, fed X as its one input, in FP32 on both."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {session.get_inputs()[0].name: X}), strict=True))
    import openvino as ov

    core = ov.Core()
    name = loaded_file(files, backend)
    weights = files.get("model.bin", b"") if name == "model.xml" else b""
    # Without the hint a CPU with bf16 units computes in bf16, so the figures would
    # depend on the machine; the server's default openvino_precision is f32 as well.
    compiled = core.compile_model(
        core.read_model(files[name], ov.Tensor(np.frombuffer(weights, np.uint8))),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32"},
    )
    results = compiled([X])
    return {o.get_any_name(): results[o] for o in compiled.outputs}
