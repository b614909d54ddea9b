"""Typed inference requests and responses, independent of the wire format.

A request is decoded in two steps: its envelope (ids, declared tensor headers, outputs,
parameters) first, which is cheap, and each tensor's data only once the headers have
been checked against the model, so a request the model would refuse costs no numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class InferInput:
    """One input tensor as declared: its data is still in wire form (`raw`) until
    `InferRequest.data` turns it into numpy."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    count: int  # elements the shape holds
    raw: Any  # the wire form of the data (a JSON list, a memoryview, a protobuf tensor)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None = the request's `binary_data_output`
    classification: int = 0  # top-k classes instead of the tensor (0 = the tensor)


# (the input, the request's decode limits) -> its data as an array of the declared shape
DataDecoder = Callable[[InferInput, Any], np.ndarray]


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None  # None = every output
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # the default for outputs not named in `outputs`
    decoder: DataDecoder | None = None  # how this wire format turns `raw` into numpy
    limits: Any = None  # the DecodeLimits the envelope was read under

    def data(self) -> dict[str, tuple[str, np.ndarray]]:
        """Every input's (datatype, array), decoded now: call after the cheap checks."""
        decode = self.decoder
        if decode is None:
            raise TypeError("this request has no data decoder")
        return {t.name: (t.datatype, decode(t, self.limits)) for t in self.inputs}

    def requested(self) -> list[str] | None:
        """The names of the requested outputs, None for every output."""
        return [o.name for o in self.outputs] if self.outputs else None


@dataclass(slots=True)
class InferOutput:
    name: str
    data: np.ndarray
    binary: bool


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[InferOutput]
    parameters: dict[str, Any] = field(default_factory=dict)
