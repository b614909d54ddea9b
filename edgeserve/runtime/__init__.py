"""Model runtimes behind one small interface: ONNX Runtime and OpenVINO."""

from edgeserve.runtime.base import Runtime, RuntimeLoadError, TensorSpec, ThreadPlan
from edgeserve.runtime.select import create_runtime

__all__ = ["Runtime", "RuntimeLoadError", "TensorSpec", "ThreadPlan", "create_runtime"]
