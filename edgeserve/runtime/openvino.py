"""OpenVINO backend: reads ONNX or IR from bytes and compiles for the CPU."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import numpy as np

# OpenVINO's conversion tools send usage telemetry through `openvino_telemetry` whenever
# it imports; with the import blocked they fall back to OpenVINO's own no-op stub
# (openvino/tools/ovc/telemetry_stub.py). Nothing leaves the box unasked.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

import openvino as ov  # noqa: E402

from edgeserve.runtime.base import Runtime, RuntimeLoadError, TensorSpec  # noqa: E402
from edgeserve.runtime.datatypes import NUMPY_TO_V2  # noqa: E402

_core: ov.Core | None = None


def _shared_core() -> ov.Core:
    """One Core per process: it owns the plugin and its thread pools."""
    global _core
    if _core is None:
        _core = ov.Core()
    return _core


class OpenVinoRuntime(Runtime):
    backend = "openvino"

    def _load(self, files: Mapping[str, bytes]) -> None:
        core = _shared_core()
        if "model.xml" in files:
            weights = np.frombuffer(files.get("model.bin", b""), dtype=np.uint8)
            model = core.read_model(files["model.xml"], ov.Tensor(weights))
        elif "model.onnx" in files:
            model = core.read_model(files["model.onnx"], ov.Tensor(np.empty(0, np.uint8)))
        else:
            raise RuntimeLoadError("openvino needs model.xml + model.bin or model.onnx")
        config = {
            "INFERENCE_NUM_THREADS": self.threads.intra_op,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # OpenVINO silently computes in bf16 where the CPU has it; serve what was shipped.
            "INFERENCE_PRECISION_HINT": self.threads.precision,
        }
        self._compiled = core.compile_model(model, "CPU", config)
        self.inputs = [_spec(p) for p in self._compiled.inputs]
        self.outputs = [_spec(p) for p in self._compiled.outputs]
        self._output_index = {p.get_any_name(): i for i, p in enumerate(self._compiled.outputs)}

    def _run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        # An infer request is not thread-safe; one per call is cheap next to the compute.
        request = self._compiled.create_infer_request()
        request.infer(dict(inputs), share_inputs=True)
        names = list(outputs) if outputs else list(self._output_index)
        return {n: request.get_output_tensor(self._output_index[n]).data.copy() for n in names}

    def close(self) -> None:
        self._compiled = None  # type: ignore[assignment]


def _spec(port: ov.runtime.ConstOutput) -> TensorSpec:
    element = port.get_element_type()
    try:
        datatype = NUMPY_TO_V2[np.dtype(element.to_dtype())]
    except (KeyError, TypeError, RuntimeError):
        raise RuntimeLoadError(
            f"tensor {port.get_any_name()!r} has type {element}, which V2 cannot carry"
        ) from None
    shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), datatype, shape)
