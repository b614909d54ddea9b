"""Cheap checks of a request's declared tensor headers against the model, made before
any tensor data is turned into numpy (a request the model would refuse costs nothing).
A declaration the model version has passed before is not checked again
(edgeserve/serving/verdicts.py)."""

from __future__ import annotations

from collections.abc import Sequence

from edgeserve.errors import InvalidInput
from edgeserve.protocol.types import InferInput
from edgeserve.serving.registry import ModelVersion, check_batch


def check_declared(model: ModelVersion, inputs: Sequence[InferInput]) -> None:
    """Refuse (400) an input the model does not take (unless it is the [features] entity
    key), or one whose declared rank, fixed dims or batch do not fit. (The datatype is
    checked with the data, so that a value out of range is named as such.) A batched
    input of 0 rows is refused too."""
    key = tuple([(tensor.name, tensor.shape) for tensor in inputs])
    passed = model.declared_passed
    if key in passed:
        return
    _check_each(model, inputs)
    passed.add(key)


def _check_each(model: ModelVersion, inputs: Sequence[InferInput]) -> None:
    """check_declared's rules, one input at a time."""
    specs = model.inputs
    batch = model.config.max_batch_size
    for tensor in inputs:
        name = tensor.name
        spec = None
        for candidate in specs:
            if candidate.name == name:
                spec = candidate
                break
        if spec is None:
            features = model.config.features
            if features.table and name == features.entity:
                continue
            raise InvalidInput(
                f"unknown input '{name[:64]}' for model '{model.name}' ({_expected(model)})"
            )
        shape = tensor.shape
        expected = spec.shape
        fits = len(shape) == len(expected)
        if fits:
            for got, want in zip(shape, expected, strict=True):
                if want != -1 and got != want:
                    fits = False
                    break
        if not fits:
            raise InvalidInput(
                f"input '{name}' has shape {list(shape)}, model expects {list(expected)} (-1 = any)"
            )
        check_batch(name, shape, batch)


def _expected(model: ModelVersion) -> str:
    """What a client should send instead: for a model with a [features] table, the entity
    key and the inputs the store does not fill; else the model's inputs."""
    features = model.config.features
    own = [s.name for s in model.inputs if not features.table or s.name not in features.inputs]
    if not features.table:
        return f"expects {', '.join(own)}"
    rest = f", and {', '.join(own)}" if own else ""
    return f"send parameter or input '{features.entity}'{rest}"
