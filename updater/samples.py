"""Running a manifest's validation samples against any runtime, given as a function.

The updater does not load models (that is the server's runtime); it does own what a
sample means: V2 JSON tensors in, expected outputs within an absolute tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from updater.manifest import Manifest, ValidationSample

V2_DTYPES: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}

RunFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


class SampleMismatch(ValueError):
    """A model gave outputs that differ from a validation sample's expected outputs."""


def sample_inputs(sample: ValidationSample) -> dict[str, np.ndarray]:
    """The sample's inputs as numpy arrays of their V2 datatype and shape."""
    arrays = {}
    for name, tensor in sample.inputs.items():
        dtype = V2_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise SampleMismatch(f"input {name}: datatype {tensor.datatype} is not supported")
        data = [s.encode() for s in tensor.data] if dtype is np.object_ else tensor.data
        arrays[name] = np.asarray(data, dtype=dtype).reshape(tensor.shape)
    return arrays


def check_outputs(sample: ValidationSample, outputs: Mapping[str, np.ndarray]) -> None:
    """Raise SampleMismatch naming the first output that is missing or off by > tolerance."""
    for name, expected in sample.expected.items():
        if name not in outputs:
            raise SampleMismatch(f"output {name} is missing from the model's outputs")
        got = np.asarray(outputs[name]).reshape(-1)
        if got.size != len(expected):
            raise SampleMismatch(f"output {name} has {got.size} values, expected {len(expected)}")
        if got.dtype.kind in "OSU":  # BYTES: exact match
            values = [g.decode() if isinstance(g, bytes) else g for g in got.tolist()]
            if values != list(expected):
                raise SampleMismatch(f"output {name} differs from the expected values")
            continue
        diff = np.abs(got.astype(np.float64) - np.asarray(expected, dtype=np.float64))
        worst = float(diff.max()) if diff.size else 0.0
        if not np.isfinite(worst) or worst > sample.tolerance:
            raise SampleMismatch(
                f"output {name} differs by {worst:.6g}, more than the tolerance "
                f"{sample.tolerance:.6g}"
            )


def run_samples(manifest: Manifest, run: RunFn) -> int:
    """Run every sample through `run` and check it; returns how many passed (all, or raise)."""
    for index, sample in enumerate(manifest.samples):
        try:
            check_outputs(sample, run(sample_inputs(sample)))
        except SampleMismatch as exc:
            raise SampleMismatch(f"sample {index}: {exc}") from None
    return len(manifest.samples)
