"""OpenVINO backend: reads ONNX or IR from bytes and compiles for the CPU, one stream
per call the server may make at once, with a pool of reusable infer requests."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# OpenVINO's conversion tools send usage telemetry through `openvino_telemetry` whenever
# it imports; with the import blocked they fall back to OpenVINO's own no-op stub
# (openvino/tools/ovc/telemetry_stub.py). Nothing leaves the box unasked.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

import openvino as ov  # noqa: E402

from edgeserve.runtime.base import Runtime, RuntimeLoadError, TensorSpec, ThreadPlan  # noqa: E402
from edgeserve.runtime.datatypes import NUMPY_TO_V2  # noqa: E402

_core: ov.Core | None = None


def _shared_core() -> ov.Core:
    """One Core per process: it owns the plugin and its thread pools."""
    global _core
    if _core is None:
        _core = ov.Core()
    return _core


# OpenVINO prefixes its messages with the source lines that raised them
# ("Exception from src/inference/src/cpp/core.cpp:105:", "Check 'x' failed at f.cpp:1:").
_SOURCE_LINE = re.compile(r"^(Exception from|Check '.*' failed at) \S+:\d+:?$")
MAX_REASON_CHARS = 1000


def openvino_reason(exc: BaseException) -> str:
    """The first line of OpenVINO's own message (past its source-location lines) and,
    for a failed conversion, the summary's lines that name the operations."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = [line for line in lines if not _SOURCE_LINE.match(line)]
    if not message:
        return type(exc).__name__
    reason = message[0]
    if "Summary:" in message:
        summary = message[message.index("Summary:") + 1 :]
        reason += " " + " ".join(line for line in summary if line.startswith("--"))
    return reason[:MAX_REASON_CHARS]


class OpenVinoRuntime(Runtime):
    backend = "openvino"

    def _load(self, files: Mapping[str, bytes]) -> None:
        try:
            self._read_and_compile(files)
        except RuntimeLoadError:
            raise
        except Exception as exc:  # OpenVINO's RuntimeError and friends: keep its message
            raise RuntimeLoadError(
                f"openvino could not load the model: {openvino_reason(exc)}"
            ) from exc

    def _read_and_compile(self, files: Mapping[str, bytes]) -> None:
        core = _shared_core()
        if "model.xml" in files:
            weights = np.frombuffer(files.get("model.bin", b""), dtype=np.uint8)
            model = core.read_model(files["model.xml"], ov.Tensor(weights))
        elif "model.onnx" in files:
            model = core.read_model(files["model.onnx"], ov.Tensor(np.empty(0, np.uint8)))
        else:
            raise RuntimeLoadError("openvino needs model.xml + model.bin or model.onnx")
        config = compile_config(self.threads)
        self._compiled = core.compile_model(model, "CPU", config)
        self.inputs = [_spec(p) for p in self._compiled.inputs]
        self.outputs = [_spec(p) for p in self._compiled.outputs]
        self._output_index = {p.get_any_name(): i for i, p in enumerate(self._compiled.outputs)}
        # One infer request per caller the plan expects, made now and reused (making one per
        # call costs time too). A request is not thread-safe, so each call borrows one; a
        # caller beyond the plan gets a new one, which then stays in the pool. Measured
        # against AsyncInferQueue behind this synchronous run(): the queue was 2-3x slower
        # on digits (callback + wake-up per call) and no faster on MiniLM, and a failed
        # inference never fires its callback, which would leave the caller waiting.
        callers = max(1, self.threads.streams)
        self._idle = [self._compiled.create_infer_request() for _ in range(callers)]

    @property
    def streams(self) -> int:
        """Streams OpenVINO compiled: the plan's, capped by the CPU plugin at the cores."""
        return int(self._compiled.get_property("NUM_STREAMS"))

    def _run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        try:
            request = self._idle.pop()  # list.pop/append are atomic under the GIL
        except IndexError:
            request = self._compiled.create_infer_request()
        try:
            request.infer(dict(inputs), share_inputs=True)
            names = list(outputs) if outputs else list(self._output_index)
            # Copied: the request's output memory is overwritten by its next call.
            return {n: request.get_output_tensor(self._output_index[n]).data.copy() for n in names}
        finally:
            self._idle.append(request)

    def close(self) -> None:
        self._idle = []
        self._compiled = None  # type: ignore[assignment]


def compile_config(threads: ThreadPlan) -> dict[str, Any]:
    """One CPU stream per concurrent caller, all of the model's threads shared among them.

    With one stream, two executor threads calling at once queue on it. Measured on MiniLM
    with 2 callers (bench/raw.py, 2 cores): 2 streams ran 1.7-2x the rows/s of 1; the
    THROUGHPUT and LATENCY hints were equal with the streams set, so THROUGHPUT for
    several. CPU pinning is off: it pins the executor threads that call in, and made a
    lone caller 2-3x slower on a small model (digits) while gaining nothing with two.
    """
    streams = max(1, threads.streams)
    return {
        "NUM_STREAMS": streams,
        "INFERENCE_NUM_THREADS": streams * threads.intra_op,
        "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY",
        "ENABLE_CPU_PINNING": False,
        # OpenVINO silently computes in bf16 where the CPU has it; serve what was shipped.
        "INFERENCE_PRECISION_HINT": threads.precision,
    }


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
