"""Typed inference requests and responses, independent of the wire format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class InferInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None  # None = every output
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # the default for outputs not named in `outputs`


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
