"""The `Runtime` interface: load a model from bytes, run named numpy tensors.

Subclasses implement `_load` and `_run`; the public methods guarantee that only
`RuntimeLoadError` (at load) or `InferenceFailed` (at run) escape, so a backend's
exception types never leak into the server.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeserve.errors import InferenceFailed

log = logging.getLogger(__name__)


class RuntimeLoadError(Exception):
    """The backend could not load or compile the model; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the Open Inference Protocol describes it."""

    name: str
    datatype: str  # V2 datatype name, e.g. FP32
    shape: tuple[int, ...]  # -1 for a variable dimension


@dataclass(frozen=True)
class ThreadPlan:
    """How a backend may compute one call: threads (sized so executor x intra-op <= cores)
    and the precision OpenVINO may compute in (f32 keeps the model's own numbers; bf16
    is faster on CPUs with AVX512-BF16/AMX but changes the answers)."""

    intra_op: int = 1
    inter_op: int = 1
    precision: str = "f32"
    # Calls the server may make at once on this model version (its executor slots);
    # OpenVINO compiles one stream per call so that concurrent callers never queue.
    streams: int = 1


class Runtime(ABC):
    """One loaded model in one backend. `run` is thread-safe and releases the GIL."""

    backend: str = "abstract"

    def __init__(self, threads: ThreadPlan) -> None:
        self.threads = threads
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    def load(self, files: Mapping[str, bytes]) -> None:
        """Load from in-memory files (`model.onnx`, or `model.xml` + `model.bin`)."""
        try:
            self._load(files)
        except RuntimeLoadError:
            raise
        except Exception as exc:  # backend errors vary by version; keep the text, drop the type
            raise RuntimeLoadError(
                f"{self.backend} could not load the model: {_first_line(exc)}"
            ) from exc

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Compute the requested outputs (all when `outputs` is None)."""
        try:
            return self._run(inputs, outputs)
        except Exception as exc:
            log.warning("inference failed backend=%s error=%s", self.backend, _first_line(exc))
            raise InferenceFailed("the model failed to compute this input") from exc

    def close(self) -> None:  # noqa: B027 - optional hook, most backends free on GC
        """Free the backend's memory; the object must not be used afterwards."""

    @abstractmethod
    def _load(self, files: Mapping[str, bytes]) -> None: ...

    @abstractmethod
    def _run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]: ...


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
