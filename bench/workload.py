"""The requests every contender gets: sample rows for a model and their V2 JSON bodies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from edgeserve.runtime import TensorSpec, ThreadPlan, create_runtime
from edgeserve.runtime.datatypes import V2_TO_NUMPY
from edgeserve.serving.repository import read_model

SENTENCES = [
    "The delivery arrived two days late and the box was damaged.",
    "Great service, the staff were friendly and quick.",
    "How do I reset the password on my account?",
    "The printer on the second floor is out of toner again.",
    "Please schedule a follow-up appointment for next Tuesday.",
    "The invoice total does not match the purchase order.",
    "Our store opens at nine on weekdays and ten on Saturdays.",
    "The patient reports mild headaches after the new medication.",
]
SEQUENCE = 32


def signature(model_dir: Path, version: int, backend: str) -> list[TensorSpec]:
    files = read_model(model_dir).read_files(version)
    runtime = create_runtime(backend, files, ThreadPlan(1, 1))
    specs = list(runtime.inputs)
    runtime.close()
    return specs


def sample_rows(model_dir: Path, specs: list[TensorSpec], n: int = 64) -> dict[str, np.ndarray]:
    """`n` rows per input (first dimension = rows): held-out data when the model ships it."""
    heldout = model_dir / "heldout.npz"
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = [n] + [SEQUENCE if d == -1 else d for d in spec.shape[1:]]
        name = spec.name.lower()
        if heldout.exists() and len(specs) == 1 and spec.datatype.startswith("FP"):
            x = np.load(heldout)["X"].astype(V2_TO_NUMPY[spec.datatype])
            out[spec.name] = np.resize(x, [n, *x.shape[1:]])
        elif spec.datatype == "BYTES":
            words = [SENTENCES[i % len(SENTENCES)].encode() for i in range(n)]
            out[spec.name] = np.array(words, dtype=object).reshape([n] + [1] * (len(shape) - 1))
        elif "mask" in name:
            out[spec.name] = np.ones(shape, V2_TO_NUMPY[spec.datatype])
        elif "type" in name:
            out[spec.name] = np.zeros(shape, V2_TO_NUMPY[spec.datatype])
        elif spec.datatype.startswith(("INT", "UINT")):
            ids = rng.integers(1000, 20000, size=shape)
            ids[:, 0] = 101  # [CLS]
            ids[:, -1] = 102  # [SEP]
            out[spec.name] = ids.astype(V2_TO_NUMPY[spec.datatype])
        else:
            out[spec.name] = rng.normal(size=shape).astype(V2_TO_NUMPY[spec.datatype])
    return out


def bodies(specs: list[TensorSpec], rows: dict[str, np.ndarray]) -> list[bytes]:
    """One JSON request body per row (batch of 1), as a client would send it."""
    n = len(next(iter(rows.values())))
    docs = []
    for i in range(n):
        inputs = []
        for spec in specs:
            row = rows[spec.name][i : i + 1]
            data = (
                [v.decode() for v in row.reshape(-1)]
                if spec.datatype == "BYTES"
                else row.reshape(-1).tolist()
            )
            inputs.append(
                {
                    "name": spec.name,
                    "datatype": spec.datatype,
                    "shape": list(row.shape),
                    "data": data,
                }
            )
        docs.append(orjson.dumps({"inputs": inputs}))
    return docs


def binary_bodies(
    specs: list[TensorSpec], rows: dict[str, np.ndarray], outputs: list[str]
) -> tuple[list[bytes], int]:
    """One binary-extension body per row, as `tritonclient.http` sends by default (tensors
    as raw little-endian bytes after a JSON header, outputs asked for as binary), and the
    JSON header's length, which is the same for every row of fixed-width inputs."""
    n = len(next(iter(rows.values())))
    docs, lengths = [], set()
    for i in range(n):
        inputs, blobs = [], []
        for spec in specs:
            if spec.datatype == "BYTES":
                raise ValueError("binary bodies are built for numeric inputs only")
            row = np.ascontiguousarray(rows[spec.name][i : i + 1])
            blob = row.astype(row.dtype.newbyteorder("<"), copy=False).tobytes()
            inputs.append(
                {
                    "name": spec.name,
                    "datatype": spec.datatype,
                    "shape": list(row.shape),
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
            blobs.append(blob)
        wanted = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
        head = orjson.dumps({"inputs": inputs, "outputs": wanted})
        lengths.add(len(head))
        docs.append(head + b"".join(blobs))
    if len(lengths) != 1:
        raise ValueError("binary bodies need the same JSON header length for every row")
    return docs, lengths.pop()


def binary_workload(
    model_dir: Path,
    version: int,
    backend: str,
    specs: list[TensorSpec],
    rows: dict[str, np.ndarray],
) -> tuple[list[bytes], dict[str, str]]:
    """`binary_bodies` for every output of the model, and the headers they go with."""
    runtime = create_runtime(backend, read_model(model_dir).read_files(version), ThreadPlan(1, 1))
    outputs = [spec.name for spec in runtime.outputs]
    runtime.close()
    bodies, header_length = binary_bodies(specs, rows, outputs)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }
    return bodies, headers
