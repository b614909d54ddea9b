"""ONNX Runtime backend: one InferenceSession per model version, created from bytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from edgeserve.runtime.base import Runtime, RuntimeLoadError, TensorSpec
from edgeserve.runtime.datatypes import ONNX_TYPE_TO_V2


class OnnxRuntime(Runtime):
    backend = "onnxruntime"

    def _load(self, files: Mapping[str, bytes]) -> None:
        model = files.get("model.onnx")
        if model is None:
            raise RuntimeLoadError("onnxruntime needs a model.onnx file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads.intra_op
        options.inter_op_num_threads = self.threads.inter_op
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Threads spin after a call to cut latency; with an executor already busy on
        # every core that spinning only steals time from the other calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        # No CPU memory arena: with it, a long-running process computed the same MiniLM
        # batch at one of two speeds (~22.5 or 24.5-27 ms) for tens of seconds at a time,
        # and served 490 instead of 610 rows/s in those stretches; without it every
        # stretch ran at the fast one (bench/RESULTS.md, "ONNX Runtime's memory arena").
        options.enable_cpu_mem_arena = False
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.inputs = [_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_spec(o) for o in self._session.get_outputs()]
        self._string_inputs = {s.name for s in self.inputs if s.datatype == "BYTES"}

    def _run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        feed = {
            name: (_as_str(a) if name in self._string_inputs else a) for name, a in inputs.items()
        }
        names = list(outputs) if outputs else [o.name for o in self.outputs]
        results = self._session.run(names, feed)
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ONNX_TYPE_TO_V2.get(arg.type)
    if datatype is None:
        raise RuntimeLoadError(f"tensor {arg.name!r} has type {arg.type}, which V2 cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


def _as_str(array: np.ndarray) -> np.ndarray:
    """ONNX Runtime wants str objects for string tensors; V2 BYTES arrive as bytes."""
    if array.dtype == np.object_ and array.size and isinstance(array.flat[0], bytes):
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array)
    return array
