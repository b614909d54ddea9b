"""Running bundles in the real runtime: validation before a flip, samples for new bundles.

The updater package owns what a sample means (`updater.run_samples`); this module owns
how a model is loaded (`create_runtime`, from bytes, as the registry does).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgeserve.runtime import Runtime, ThreadPlan, create_runtime
from edgeserve.runtime.datatypes import V2_TO_NUMPY
from edgeserve.serving.repository import MODEL_FILES, ModelConfig, parse_model_config
from updater import Manifest, SampleTensor, ValidationSample, Validator, run_samples

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 4
DEFAULT_TOLERANCE = 1e-3  # absolute: ONNX Runtime and OpenVINO differ in the last FP32 bits


def bundle_config(manifest: Manifest) -> ModelConfig:
    """The model.toml carried in the (signed) manifest, parsed like a repository one."""
    if not manifest.model_config:
        return ModelConfig(backend=manifest.backend)
    return parse_model_config(manifest.model_config, f"{manifest.model} bundle model.toml")


def load_runtime(
    files: Mapping[str, bytes], config: ModelConfig, default_backend: str, threads: ThreadPlan
) -> Runtime:
    backend = config.backend if config.backend != "auto" else default_backend
    return create_runtime(backend, files, threads)


def make_validator(default_backend: str, threads: ThreadPlan) -> Validator:
    """The store's validate callback: load in the real runtime, run the manifest's samples.

    Any exception refuses the bundle (the store turns it into BundleRejected
    `validation_failed` with this message), before anything is written.
    """

    def validate(files: Mapping[str, bytes], manifest: Manifest) -> None:
        runtime = load_runtime(files, bundle_config(manifest), default_backend, threads)
        try:
            passed = run_samples(manifest, lambda feeds: runtime.run(feeds, None))
        finally:
            runtime.close()
        if not passed:
            log.warning(
                "bundle has no validation samples model=%s version=%s",
                manifest.model,
                manifest.version,
            )

    return validate


def read_version_files(model_dir: Path, version: int) -> dict[str, bytes]:
    folder = model_dir / str(version)
    return {n: (folder / n).read_bytes() for n in MODEL_FILES if (folder / n).is_file()}


def _sample_feed(runtime: Runtime, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for spec in runtime.inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        dtype = V2_TO_NUMPY[spec.datatype]
        if spec.datatype == "BYTES":
            raise ValueError(f"input {spec.name} is BYTES: give validation samples with --samples")
        if spec.datatype == "BOOL":
            feed[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif np.dtype(dtype).kind in "iu":
            feed[spec.name] = rng.integers(0, 10, shape).astype(dtype)
        else:  # rounded, so the manifest stays short and exact in JSON
            feed[spec.name] = np.round(rng.uniform(0.0, 1.0, shape), 3).astype(dtype)
    return feed


def record_samples(
    model_dir: Path,
    version: int,
    count: int = DEFAULT_SAMPLES,
    tolerance: float = DEFAULT_TOLERANCE,
    backend: str = "onnxruntime",
) -> list[ValidationSample]:
    """Deterministic inputs from the model's declared inputs, with the outputs it gives now.

    What the author's machine computes becomes what the box must reproduce before it
    flips; a seeded generator makes the same bundle twice from the same model. Where the
    version carries a form per backend, a sample's tolerance covers twice their spread.
    """
    config = parse_model_config((model_dir / "model.toml").read_text("utf-8"), "model.toml")
    files = read_version_files(model_dir, version)
    runtime = load_runtime(files, config, backend, ThreadPlan())
    others = _other_forms(files, config, runtime.backend)
    rng = np.random.default_rng(20260101)
    samples = []
    try:
        for _ in range(count):
            feed = _sample_feed(runtime, rng)
            outputs = runtime.run(feed, None)
            spread = max((_spread(outputs, other.run(feed, None)) for other in others), default=0)
            inputs = {
                name: SampleTensor(spec.datatype, tuple(array.shape), tuple(array.ravel().tolist()))
                for spec in runtime.inputs
                for name, array in [(spec.name, feed[spec.name])]
            }
            expected = {
                name: tuple(
                    v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()
                )
                for name, array in outputs.items()
            }
            samples.append(ValidationSample(inputs, expected, max(tolerance, 2 * spread)))
    finally:
        runtime.close()
        for other in others:
            other.close()
    return samples


def _other_forms(files: Mapping[str, bytes], config: ModelConfig, used: str) -> list[Runtime]:
    """The other backend, when the version carries a second form of the model for it.

    A folder with model.onnx and model.xml holds two quantizations of one version (ONNX
    Runtime reads the first, OpenVINO prefers the second); the box may serve either.
    """
    if config.backend != "auto" or not {"model.onnx", "model.xml"} <= files.keys():
        return []
    other = "openvino" if used == "onnxruntime" else "onnxruntime"
    return [create_runtime(other, files, ThreadPlan())]


def _spread(expected: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> float:
    """Largest difference between two forms' outputs; integer outputs must agree exactly."""
    worst = 0.0
    for name, array in expected.items():
        if array.dtype.kind not in "fiub":
            continue
        if array.dtype.kind != "f" and not np.array_equal(array, other[name]):
            raise ValueError(
                f"the model's two forms disagree on output {name} for a generated sample: "
                "give validation samples with --samples"
            )
        diff = np.abs(array.astype(np.float64) - other[name].astype(np.float64))
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst
