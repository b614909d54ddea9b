"""A model folder without model.toml: its configuration completed from the model file,
as Triton's auto-complete does for ONNX Runtime and OpenVINO models.

Inputs and outputs (names, datatypes, dims) come from the loaded runtime; when every
input and output has a dynamic first dimension it is the batch dimension, and the
model gets Triton's default `max_batch_size` of 4 with the dynamic batcher.
"""

from __future__ import annotations

from dataclasses import replace

from edgeserve.config.schema import ConfigError
from edgeserve.runtime import Runtime, RuntimeLoadError, TensorSpec
from edgeserve.serving.repository import ModelConfig, TensorConfig

DEFAULT_MAX_BATCH_SIZE = 4  # Triton's --backend-config=default-max-batch-size


def completed(config: ModelConfig, runtime: Runtime) -> ModelConfig:
    """`config` with the signature and batch size the model file declares."""
    specs = runtime.inputs + runtime.outputs
    batched = bool(specs) and all(s.shape and s.shape[0] == -1 for s in specs)
    try:
        return replace(
            config,
            max_batch_size=DEFAULT_MAX_BATCH_SIZE if batched else 0,
            inputs=[_tensor(s) for s in runtime.inputs],
            outputs=[_tensor(s) for s in runtime.outputs],
        )
    except ConfigError as exc:  # a dimension model.toml could not declare (0, < -1)
        raise RuntimeLoadError(f"cannot derive a configuration: {exc}") from None


def describe(config: ModelConfig) -> str:
    """The derived part of a configuration, for the log: `max_batch_size=4
    inputs=input:FP32[-1,64] outputs=...`."""

    def tensors(specs: list[TensorConfig]) -> str:
        return ",".join(f"{t.name}:{t.datatype}{list(t.shape)}".replace(" ", "") for t in specs)

    return (
        f"max_batch_size={config.max_batch_size} inputs={tensors(config.inputs)} "
        f"outputs={tensors(config.outputs)}"
    )


def _tensor(spec: TensorSpec) -> TensorConfig:
    return TensorConfig(spec.name, spec.datatype, [int(d) for d in spec.shape])
