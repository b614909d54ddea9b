"""A compute-bound stand-in for MiniLM when MiniLM is not built: one 1024x1024 weight
applied LAYERS times (small file, ~1 GFLOP per row, 64 floats in), so a request costs
milliseconds of compute next to ~0.1 ms of HTTP, and batching has a lot to win, as with
a transformer. Built into a temporary repository by the benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

IN = 64
WIDTH = 1024
LAYERS = 400


def build_mlp(root: Path, name: str = "mlp-synthetic") -> Path:
    """`root/name/1/model.onnx` + model.toml; returns the model folder."""
    rng = np.random.default_rng(0)
    w_in = (rng.normal(size=(IN, WIDTH)) / np.sqrt(IN)).astype(np.float32)
    w = (rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "w_in"], ["h0"])]
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceSum", [f"h{LAYERS}"], ["score"], keepdims=0, axes=[1]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, IN])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(w_in, "w_in"), numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    folder = root / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "model.toml").write_text(
        'description = "synthetic compute-bound MLP (bench only)"\n'
        'backend = "onnxruntime"\nmax_batch_size = 32\n[warmup]\nbatch_sizes = [1, 32]\n'
    )
    return folder
