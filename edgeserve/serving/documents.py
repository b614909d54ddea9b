"""The protocol's read-only documents, built once for both transports.

Server and model metadata, Triton's model configuration, statistics and repository
index, as plain dicts in the JSON form of the KServe V2 / Triton REST APIs. REST sends
them as JSON; gRPC parses the same dicts into its messages (`json_format.ParseDict`),
so the two cannot drift apart. No HTTP and no gRPC here.
"""

from __future__ import annotations

from typing import Any

from edgeserve import __version__
from edgeserve.errors import ModelNotFound
from edgeserve.serving.registry import ModelVersion, Registry, VersionState

# Only what works: each is exercised by tests/test_protocol_conformance.py or
# tests/test_model_control.py (GET /v2/models/{m}/config is model_configuration).
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "statistics",
]


def server_metadata() -> dict[str, Any]:
    return {"name": "edgeserve", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(registry: Registry, name: str, version: str | None) -> dict[str, Any]:
    model = registry.get(name, version)
    return {
        "name": model.name,
        "versions": [str(v) for v in sorted(registry.loaded(model.name))],
        "platform": model.platform,
        "inputs": [_tensor(s) for s in model.inputs],
        "outputs": [_tensor(s) for s in model.outputs],
    }


def model_config(model: ModelVersion) -> dict[str, Any]:
    """Triton's model configuration: dims without the batch dimension of batched models."""
    batched = model.config.max_batch_size > 0

    def tensors(specs: list) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "data_type": "TYPE_STRING" if s.datatype == "BYTES" else f"TYPE_{s.datatype}",
                "dims": list(s.shape[1:] if batched else s.shape),
            }
            for s in specs
        ]

    doc: dict[str, Any] = {
        "name": model.name,
        "platform": model.platform,
        "backend": model.runtime.backend,
        "max_batch_size": model.config.max_batch_size,
        "input": tensors(model.inputs),
        "output": tensors(model.outputs),
    }
    if model.config.max_batch_size > 1:  # the dynamic batcher runs (registry.py)
        b = model.config.batching
        doc["dynamic_batching"] = {
            "preferred_batch_size": [b.preferred_batch_size] if b.preferred_batch_size else [],
            "max_queue_delay_microseconds": round(b.max_queue_delay_ms * 1000),
        }
    return doc


def model_statistics(registry: Registry, name: str | None, version: str | None) -> dict[str, Any]:
    """Triton's statistics of every loaded version of `name` (all models when None)."""
    names = [name] if name else registry.names()
    stats = []
    for n in names:
        if n not in registry.names():
            raise ModelNotFound(f"unknown model '{n}'")
        loaded = registry.loaded(n)
        if version:
            chosen = registry.get(n, version)
            loaded = {chosen.version: chosen}
        stats.extend(_statistics(m) for _, m in sorted(loaded.items()))
    return {"model_stats": stats}


def repository_index(registry: Registry, ready_only: bool) -> list[dict[str, str]]:
    index = []
    for name in registry.names():
        for number, status in sorted(registry.statuses(name).items()):
            if ready_only and status.state is not VersionState.READY:
                continue
            entry = {"name": name, "version": str(number), "state": status.state.value}
            if status.reason:
                entry["reason"] = status.reason
            index.append(entry)
    return index


def _tensor(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _statistics(m: ModelVersion) -> dict[str, Any]:
    s = m.stats

    def counter(c: Any) -> dict[str, int]:
        return {"count": c.count, "ns": c.ns}

    zero = {"count": 0, "ns": 0}
    cache = getattr(m.scheduler, "cache_stats", None)
    return {
        "name": m.name,
        "version": str(m.version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": counter(s.success),
            "fail": counter(s.fail),
            "queue": counter(s.queue),
            "compute_input": counter(s.compute_input),
            "compute_infer": counter(s.compute_infer),
            "compute_output": counter(s.compute_output),
            "cache_hit": counter(cache.hit) if cache else zero,
            "cache_miss": counter(cache.miss) if cache else zero,
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": counter(b.compute_input),
                "compute_infer": counter(b.compute_infer),
                "compute_output": counter(b.compute_output),
            }
            for size, b in sorted(s.batches.items())
        ],
    }
