"""Cheap checks of a request's declared tensor headers against the model, made before
any tensor data is turned into numpy (a request the model would refuse costs nothing)."""

from __future__ import annotations

from collections.abc import Sequence

from edgeserve.errors import InvalidInput
from edgeserve.protocol.types import InferInput
from edgeserve.registry import ModelVersion


def check_declared(model: ModelVersion, inputs: Sequence[InferInput]) -> None:
    """Refuse (400) an input the model does not take (unless it is the [features] entity
    key), or one whose declared rank, fixed dims or batch do not fit. (The datatype is
    checked with the data, so that a value out of range is named as such.)"""
    specs = model.inputs
    batch = model.config.max_batch_size
    entity = model.config.features.entity if model.config.features.table else None
    for tensor in inputs:
        spec = next((s for s in specs if s.name == tensor.name), None)
        if spec is None:
            if tensor.name == entity:
                continue
            raise InvalidInput(
                f"unknown input '{tensor.name[:64]}' for model '{model.name}' (expects "
                f"{', '.join(s.name for s in specs)})"
            )
        shape = tensor.shape
        if len(shape) != len(spec.shape) or any(
            want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
        ):
            raise InvalidInput(
                f"input '{spec.name}' has shape {list(shape)}, model "
                f"expects {list(spec.shape)} (-1 = any)"
            )
        if batch and shape and shape[0] > batch:
            raise InvalidInput(
                f"input '{spec.name}': batch of {shape[0]} exceeds max_batch_size {batch}"
            )
