"""Backend choice: `auto` prefers OpenVINO when it compiles the model, else ONNX Runtime."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from edgeserve.runtime.base import Runtime, RuntimeLoadError, ThreadPlan

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "openvino")


def create_runtime(
    backend: str, files: Mapping[str, bytes], threads: ThreadPlan, model: str = "?"
) -> Runtime:
    """Load `files` into the named backend; `auto` falls back with a logged reason."""
    if backend == "openvino":
        return _load("openvino", files, threads)
    if backend == "onnxruntime":
        return _load("onnxruntime", files, threads)
    if backend != "auto":
        raise RuntimeLoadError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    try:
        return _load("openvino", files, threads)
    except RuntimeLoadError as exc:
        if "model.onnx" not in files:
            raise
        log.info(
            "backend fallback model=%s from=openvino to=onnxruntime reason=%r", model, str(exc)
        )
        return _load("onnxruntime", files, threads)


def _load(backend: str, files: Mapping[str, bytes], threads: ThreadPlan) -> Runtime:
    runtime: Runtime
    if backend == "openvino":
        from edgeserve.runtime.openvino import OpenVinoRuntime

        runtime = OpenVinoRuntime(threads)
    else:
        from edgeserve.runtime.onnx import OnnxRuntime

        runtime = OnnxRuntime(threads)
    runtime.load(files)
    return runtime
